"""model.train's command line: its flags, each checked before any data is read.

Usage:
  args = parse_args(['--data_dir', PREP_OUT, '--job_dir', JOB, '--export_base', EXPORT])
  model.fit(..., verbose=fit_verbosity(args.progress))
"""
import argparse
import logging
import sys

import tensorflow as tf

from model import command_line
from model import dataset as dataset_lib
from model import network
from model.training_model import DEFAULT_ARCHITECTURE, load_architecture

__all__ = ['FIT_VERBOSITY', 'fit_verbosity', 'parse_args']

# --progress -> Keras' fit verbosity ('auto' is decided by `fit_verbosity`).
FIT_VERBOSITY = {'auto': None, 'bar': 1, 'epoch': 2, 'none': 0}


def fit_verbosity(progress: str) -> int:
  """Keras' verbosity for --progress: 'auto' is a live bar on a terminal, a line per epoch in a
  log, where a bar would be thousands of carriage returns."""
  if FIT_VERBOSITY[progress] is None:
    return 1 if sys.stdout.isatty() else 2
  return FIT_VERBOSITY[progress]


def parse_args(argv=None) -> argparse.Namespace:
  parser = command_line.ArgumentParser(
      prog='python -m model.train',
      description='Train the Planet model on a preprocess output, evaluate it, export it.')
  parser.add_argument('--data_dir', type=command_line.user_path,
                      required=True, help='a beam_jobs.preprocess output folder')
  parser.add_argument('--job_dir', type=command_line.user_path, required=True,
                      help='checkpoints/, logs/, history.json, metrics.json, manifest.json go here')
  parser.add_argument('--export_base', type=command_line.user_path, required=True,
                      help='the trained model goes to EXPORT_BASE/PlanetModel/<next version>/')
  parser.add_argument('--epochs', type=int, default=10, help='total epochs, counting resumed ones')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--learning_rate', type=float, default=1e-3, help='Adam; ignored on --resume')
  parser.add_argument('--patience', type=int, default=3,
                      help='stop after this many epochs without a lower eval loss; 0 never stops')
  parser.add_argument('--resume', action='store_true',
                      help='continue from the newest checkpoint in JOB/checkpoints/')
  parser.add_argument('--no_augment', dest='augment', action='store_false',
                      help='no random flips and 90-degree rotations of training chips')
  parser.add_argument('--image_size', type=int,
                      help='refuse data prepared at another size (default: the manifest\'s)')
  parser.add_argument('--architecture', default=DEFAULT_ARCHITECTURE,
                      help='module:function building float features from a [0, 1] image tensor, '
                           f'or a keras.applications preset: {", ".join(network.PRESETS)} '
                           '(ignored on --resume: the checkpoint holds the network)')
  parser.add_argument('--backbone_weights',
                      help="a preset's backbone weights file you have (Keras' *_no_top.h5, or a "
                           '.weights.h5 saved from such a backbone); nothing is downloaded. '
                           'Default: random initial weights')
  parser.add_argument('--frozen_epochs', type=int, default=0,
                      help="a preset's first epochs train the heads only, its backbone frozen; "
                           'then the whole model is fine-tuned at --fine_tune_learning_rate')
  parser.add_argument('--fine_tune_learning_rate', type=float,
                      help='Adam, after --frozen_epochs (default: --learning_rate / 10)')
  parser.add_argument('--shuffle_buffer', type=int, default=dataset_lib.DEFAULT_SHUFFLE_BUFFER)
  parser.add_argument('--seed', type=int, help='seed every random draw (weights, shuffle, augment)')
  parser.add_argument('--progress', choices=sorted(FIT_VERBOSITY), default='auto',
                      help="Keras' progress: a live bar, a line per epoch, or none (default: a bar "
                           'on a terminal, a line per epoch otherwise, e.g. in CI logs)')
  args = parser.parse_args(argv)
  for name in ('epochs', 'batch_size'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be at least 1')
  if args.learning_rate <= 0:
    parser.error('--learning_rate must be positive')
  try:
    load_architecture(args.architecture)   # a typo fails now, not after the data checks
  except ValueError as e:
    parser.error(str(e))
  _check_transfer_flags(parser, args)
  return args


def _check_transfer_flags(parser, args) -> None:
  """The transfer-learning flags go with a preset, and a weights file must exist."""
  preset = args.architecture in network.PRESETS
  if not preset and (args.backbone_weights or args.frozen_epochs):
    parser.error(f'--backbone_weights and --frozen_epochs go with a preset --architecture '
                 f'({", ".join(network.PRESETS)}), not {args.architecture}')
  if not 0 <= args.frozen_epochs <= args.epochs:
    parser.error(f'--frozen_epochs must be between 0 and --epochs ({args.epochs})')
  if args.fine_tune_learning_rate is not None:
    if not args.frozen_epochs:
      parser.error('--fine_tune_learning_rate is the rate after --frozen_epochs: give both')
    if args.fine_tune_learning_rate <= 0:
      parser.error('--fine_tune_learning_rate must be positive')
  else:
    args.fine_tune_learning_rate = args.learning_rate / 10
  if args.backbone_weights and not tf.io.gfile.exists(args.backbone_weights):
    parser.error(f'--backbone_weights {args.backbone_weights} does not exist')
  if args.frozen_epochs and not args.backbone_weights and not args.resume:
    logging.warning('--frozen_epochs without --backbone_weights: the first %d epochs train the '
                    'heads on a random backbone', args.frozen_epochs)
