r"""Trains the two-headed Planet model on a preprocess output, evaluates it, and exports it.

Usage:
  python -m model.train --data_dir PREP_OUT --job_dir JOB --export_base EXPORT \
      [--epochs 10] [--batch_size 32] [--learning_rate 1e-3] [--patience 3] [--resume] \
      [--no_augment] [--image_size 128] [--architecture model.network:tutorial_cnn]
  Transfer learning from a keras.applications backbone, its head trained first:
  python -m model.train ... --architecture mobilenet_v2 --backbone_weights NO_TOP.h5 \
      --frozen_epochs 2 [--fine_tune_learning_rate 1e-4]

Writes JOB/checkpoints/epoch_NNN.keras (model + optimizer, every epoch), JOB/logs/ (TensorBoard),
JOB/history.json (per-epoch losses, kept across --resume), JOB/metrics.json (eval F2: honest on
the test half of eval, tuned on its tuning half; per-label scores, tuned ground thresholds, the
prior-only baseline), the next EXPORT/PlanetModel/<N>/, and JOB/manifest.json last.
"""
from model import command_line

if __name__ == '__main__':
  # Before TensorFlow loads: its C++ libraries log as they load (model/command_line.py).
  command_line.quiet_third_party()

# pylint: disable=wrong-import-position,wrong-import-order
import argparse
import importlib
import json
import logging
import os
import re
import sys
import time
from typing import Callable

import numpy as np
import tensorflow as tf
import keras
from tensorflow.core.framework import summary_pb2

from model import export as export_lib
from model import dataset as dataset_lib
from model import manifest as manifest_lib
from model import network
from model import schema
from model.evaluation import describe_evaluation, evaluate, predict_split
from model.output_dir import (OutputLayout, OutputRefused, check_outputs_apart, hold_folder,
                              refuse_unknown_files)
# pylint: enable=wrong-import-position,wrong-import-order

__all__ = [
    'check_output_folders', 'checkpoint_dir', 'CHECKPOINT_PATTERN', 'compile_model',
    'DEFAULT_ARCHITECTURE', 'EpochHistory', 'EpochSummaries', 'FIT_VERBOSITY', 'fit_verbosity',
    'JOB_LAYOUT', 'list_checkpoints', 'load_architecture', 'main', 'parse_args', 'read_history',
    'restore_or_build', 'ResumableEarlyStopping', 'set_backbone_frozen', 'train'
]

DEFAULT_ARCHITECTURE = 'model.network:tutorial_cnn'
CHECKPOINT_PATTERN = 'epoch_{epoch:03d}.keras'
_CHECKPOINT_RE = re.compile(r'^epoch_(\d+)\.keras$')
# --progress -> Keras' fit verbosity ('auto' is decided by `fit_verbosity`).
FIT_VERBOSITY = {'auto': None, 'bar': 1, 'epoch': 2, 'none': 0}
# Everything model.train writes in JOB: a JOB holding anything else is refused.
JOB_LAYOUT = OutputLayout(schema.STAGE_TRAIN, (
    'checkpoints/epoch_???.keras', 'history.json', 'history.json.tmp', 'metrics.json',
    'metrics.json.tmp', 'logs/train/events.out.tfevents.*',
    'logs/validation/events.out.tfevents.*'))


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


def load_architecture(spec: str, backbone_weights: str | None = None) -> Callable:
  """The feature extractor `network.build_model` wraps: a preset's backbone (with
  `backbone_weights` loaded into it, when given), or the function `module:function` names."""
  if spec in network.PRESETS:
    return network.preset_features(spec, backbone_weights)
  module_name, _, function_name = spec.partition(':')
  if not module_name or not function_name:
    raise ValueError(f'--architecture {spec!r} must be module:function, e.g. '
                     f'{DEFAULT_ARCHITECTURE}, or a preset: {", ".join(network.PRESETS)}')
  try:
    function = getattr(importlib.import_module(module_name), function_name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'--architecture {spec!r} cannot be loaded: {e}') from None
  if not callable(function):
    raise ValueError(f'--architecture {spec!r} is not a function')
  return function


def compile_model(model: keras.Model, learning_rate: float) -> keras.Model:
  """Adam, categorical cross-entropy for weather (one of 4), binary for ground (any of 13)."""
  model.compile(
      optimizer=keras.optimizers.Adam(learning_rate),
      loss={schema.OUTPUT_WEATHER: keras.losses.CategoricalCrossentropy(),
            schema.OUTPUT_GROUND: keras.losses.BinaryCrossentropy()})
  return model


def set_backbone_frozen(model: keras.Model, frozen: bool, learning_rate: float) -> keras.Model:
  """Freezes (or unfreezes) a preset's backbone and compiles the model again with a new Adam, as
  Keras requires for a change of `trainable` to take effect. A frozen backbone's batch
  normalisation runs in inference mode (Keras 3 does so for a layer that is not trainable).

  Raises:
    ValueError: the model has no backbone (not built from a preset).
  """
  backbone = network.find_backbone(model)
  if backbone is None:
    raise ValueError('--frozen_epochs needs a model built from a preset --architecture '
                     f'({", ".join(network.PRESETS)}); this one has no backbone')
  backbone.trainable = not frozen
  return compile_model(model, learning_rate)


def checkpoint_dir(job_dir: str) -> str:
  return os.path.join(job_dir, 'checkpoints')


def list_checkpoints(job_dir: str) -> dict[int, str]:
  """Epoch number -> checkpoint path, for every checkpoint model.train wrote in JOB."""
  directory = checkpoint_dir(job_dir)
  if not tf.io.gfile.isdir(directory):
    return {}
  found = {}
  for name in tf.io.gfile.listdir(directory):
    match = _CHECKPOINT_RE.match(name)
    if match:
      found[int(match.group(1))] = os.path.join(directory, name)
  return found


def restore_or_build(args: argparse.Namespace, image_size: int) -> tuple[keras.Model, int]:
  """The model to train and the number of epochs already done.

  With --resume and a checkpoint: the newest checkpoint, with its optimizer state (step count,
  Adam moments). Otherwise a new compiled model; JOB must then hold no checkpoints, so that two
  runs never mix in one folder.
  """
  checkpoints = list_checkpoints(args.job_dir)
  if checkpoints and not args.resume:
    raise FileExistsError(
        f'{checkpoint_dir(args.job_dir)} already holds checkpoints (epochs {min(checkpoints)}-'
        f'{max(checkpoints)}): pass --resume to continue that run, or use a new --job_dir')
  if args.resume and checkpoints:
    epoch = max(checkpoints)
    model = keras.models.load_model(checkpoints[epoch])
    size = int(model.input.shape[1])
    if size != image_size:
      raise ValueError(f'{checkpoints[epoch]} takes {size} px images but the data is '
                       f'{image_size} px: resume with the data it was trained on')
    logging.info('resuming from %s: epoch %d done, optimizer step %d', checkpoints[epoch], epoch,
                 int(model.optimizer.iterations.numpy()))
    return model, epoch
  if args.resume:
    logging.warning('--resume: no checkpoint in %s, starting from scratch',
                    checkpoint_dir(args.job_dir))
  try:
    model = network.build_model(image_size, load_architecture(args.architecture,
                                                               args.backbone_weights))
  except (OSError, ValueError) as e:
    if not args.backbone_weights:
      raise
    raise ValueError(f'--backbone_weights {args.backbone_weights} cannot be loaded into the '
                     f'{args.architecture} backbone ({type(e).__name__}: {e}); give the '
                     f'no-top weights file of {args.architecture}') from None
  return compile_model(model, args.learning_rate), 0


def read_history(job_dir: str) -> list[dict]:
  path = os.path.join(job_dir, 'history.json')
  if not tf.io.gfile.exists(path):
    return []
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


class EpochHistory(keras.callbacks.Callback):
  """Keeps JOB/history.json: each epoch's losses and training speed, across --resume runs.

  Listed before the checkpoint callback, so an epoch's checkpoint never exists without its row.
  """

  def __init__(self, job_dir: str, rows: list[dict], images_per_epoch: int):
    super().__init__()
    self.path = os.path.join(job_dir, 'history.json')
    self.rows = list(rows)
    self.images_per_epoch = images_per_epoch
    self._started = self._train_seconds = 0.0

  def on_epoch_begin(self, epoch, logs=None):
    self._started = time.perf_counter()
    self._train_seconds = 0.0

  def on_test_begin(self, logs=None):
    # Validation runs inside the epoch; the speed figure counts training steps only.
    if self._started:
      self._train_seconds = time.perf_counter() - self._started

  def on_epoch_end(self, epoch, logs=None):
    seconds = self._train_seconds or (time.perf_counter() - self._started)
    row = {'epoch': epoch + 1, **{k: float(v) for k, v in (logs or {}).items()},
           'train_seconds': seconds, 'train_images_per_second': self.images_per_epoch / seconds}
    self.rows = [r for r in self.rows if r['epoch'] < epoch + 1] + [row]
    manifest_lib.write_json_atomic(self.path, self.rows)


class EpochSummaries(keras.callbacks.Callback):
  """Writes each epoch's losses as TensorBoard scalars: JOB/logs/train and JOB/logs/validation.

  TensorFlow 2.21 no longer installs the tensorboard package, which Keras's TensorBoard callback
  (through tf.summary.scalar) needs for every scalar it writes. The events written here with core
  TensorFlow alone are the ones that callback writes (tag `epoch_<name>`, the `scalars` plugin), so
  `pip install tensorboard; tensorboard --logdir JOB/logs` shows them, curves and all.
  """

  def __init__(self, log_dir: str):
    super().__init__()
    self.log_dir = log_dir
    self.writers = {}
    self.metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))

  def _writer(self, split: str):
    if split not in self.writers:
      self.writers[split] = tf.summary.create_file_writer(os.path.join(self.log_dir, split))
    return self.writers[split]

  def on_epoch_end(self, epoch, logs=None):
    for key, value in (logs or {}).items():
      split, name = ('validation', key[4:]) if key.startswith('val_') else ('train', key)
      with self._writer(split).as_default():
        tf.summary.write(f'epoch_{name}', tf.constant(float(value), tf.float32), step=epoch,
                         metadata=self.metadata)

  def on_train_end(self, logs=None):
    for writer in self.writers.values():
      writer.close()
    self.writers = {}


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
  """EarlyStopping on eval loss that remembers, across --resume, the best loss and the wait."""

  def __init__(self, patience: int, prior_rows: list[dict]):
    super().__init__(monitor='val_loss', patience=patience, verbose=1)
    self.prior_losses = [r['val_loss'] for r in prior_rows if 'val_loss' in r]

  def on_train_begin(self, logs=None):
    super().on_train_begin(logs)
    if self.prior_losses:
      best = int(np.argmin(self.prior_losses))
      self.best = self.prior_losses[best]
      self.wait = len(self.prior_losses) - 1 - best


def check_output_folders(args: argparse.Namespace) -> None:
  """Refuses, before anything is read or written, a JOB or EXPORT_BASE that is not ours.

  Each must lie apart from --data_dir and from the other, and hold only what model.train (or
  model.export) writes there: a folder of the user's own files is never written into.
  """
  check_outputs_apart({'--job_dir': args.job_dir, '--export_base': args.export_base},
                      {'--data_dir': args.data_dir})
  if tf.io.gfile.exists(args.job_dir) and not tf.io.gfile.isdir(args.job_dir):
    raise OutputRefused(f'--job_dir {args.job_dir} is a file, not a folder: give a folder path')
  refuse_unknown_files(args.job_dir, JOB_LAYOUT, '--job_dir')
  export_lib.check_export_base(args.export_base)


def _phases(args: argparse.Namespace, initial_epoch: int) -> list[tuple[int, int, bool]]:
  """The fits still to run, as (initial_epoch, epochs, backbone frozen) for `model.fit`: with
  --frozen_epochs N, epochs 1 to N with the backbone frozen, then the rest fine-tuning it."""
  bounds = [(min(args.frozen_epochs, args.epochs), True), (args.epochs, False)]
  phases, first = [], initial_epoch
  for last, frozen in bounds:
    if first < last:
      phases.append((first, last, frozen))
      first = last
  return phases


def _enter_phase(model: keras.Model, frozen: bool, first: int, args: argparse.Namespace) -> None:
  """Freezes or unfreezes a preset's backbone, recompiling, if the phase wants the other state."""
  backbone = network.find_backbone(model)
  if backbone is None and not frozen:
    return   # nothing to unfreeze (a frozen phase without a backbone is refused below)
  if backbone is not None and backbone.trainable == (not frozen):
    return   # already in the phase's state: a resumed checkpoint keeps its optimizer
  rate = args.learning_rate if frozen else args.fine_tune_learning_rate
  logging.info('epoch %d on: backbone %s, learning rate %g', first + 1,
               'frozen' if frozen else 'fine-tuned', rate)
  set_backbone_frozen(model, frozen, rate)


def _best_epoch(rows: list[dict]) -> int | None:
  losses = [(r['val_loss'], r['epoch']) for r in rows if 'val_loss' in r]
  return min(losses)[1] if losses else None


def train(args: argparse.Namespace) -> dict:
  """Runs the whole job (see the module docstring); returns what JOB/metrics.json holds."""
  check_output_folders(args)
  if args.seed is not None:
    keras.utils.set_random_seed(args.seed)
  data = dataset_lib.load_prepared(args.data_dir, args.image_size)
  # Refuses a used JOB (or a checkpoint of another size) before the read of every shard.
  model, initial_epoch = restore_or_build(args, data.image_size)
  # Held until training ends (or its process dies): a second run into JOB is refused meanwhile.
  with hold_folder(args.job_dir, JOB_LAYOUT, '--job_dir'):
    return _train_held(args, data, model, initial_epoch)


def _train_held(args: argparse.Namespace, data, model: keras.Model, initial_epoch: int) -> dict:
  """`train` once JOB is this run's: verify the shards, fit, evaluate, export."""
  summaries = dataset_lib.verify_shards(data)
  tf.io.gfile.makedirs(checkpoint_dir(args.job_dir))
  job_manifest = os.path.join(args.job_dir, schema.MANIFEST_FILE)
  if tf.io.gfile.exists(job_manifest):   # this job is unfinished again until the end
    tf.io.gfile.remove(job_manifest)

  history = [r for r in read_history(args.job_dir) if r['epoch'] <= initial_epoch]
  steps = dataset_lib.steps_per_epoch(data, 'train', args.batch_size)
  epoch_history = EpochHistory(args.job_dir, history, steps * args.batch_size)
  callbacks = [
      epoch_history,
      keras.callbacks.ModelCheckpoint(os.path.join(checkpoint_dir(args.job_dir), CHECKPOINT_PATTERN)),
      EpochSummaries(os.path.join(args.job_dir, 'logs')),
  ]
  train_data = dataset_lib.make_dataset(data, 'train', args.batch_size, training=True,
                                      augment=args.augment, shuffle_buffer=args.shuffle_buffer)
  eval_data = dataset_lib.make_dataset(data, 'eval', args.batch_size, training=False)
  phases = _phases(args, initial_epoch)
  if not phases:
    logging.warning('%d epochs already done (--epochs %d): evaluating and exporting only',
                    initial_epoch, args.epochs)
  for first, last, frozen in phases:
    _enter_phase(model, frozen, first, args)
    # A new early stopping per phase, that knows every epoch before it (kept by EpochHistory).
    stopping = [ResumableEarlyStopping(args.patience, epoch_history.rows)] if args.patience else []
    try:
      model.fit(train_data, validation_data=eval_data, epochs=last, initial_epoch=first,
                callbacks=callbacks + stopping, verbose=fit_verbosity(args.progress),
                steps_per_epoch=steps, shuffle=False)
    except tf.errors.DataLossError:
      # A shard changed after the check above; name it rather than print a byte offset.
      corrupt = dataset_lib.find_corrupt_shard(data)
      if corrupt:
        raise corrupt from None
      raise

  rows = epoch_history.rows
  best = _best_epoch(rows)
  checkpoints = list_checkpoints(args.job_dir)
  if best is not None and best in checkpoints and best != max(checkpoints):
    # Early stopping ends past the best epoch; evaluate and export the best one.
    model.load_weights(checkpoints[best])
  named_eval = dataset_lib.make_dataset(data, 'eval', args.batch_size, training=False,
                                        with_names=True)
  evaluation = evaluate(predict_split(model, named_eval), summaries['train'].label_frequencies())
  thresholds = [evaluation['ground_thresholds'][label] for label in schema.GROUND_LABELS]
  speeds = [r['train_images_per_second'] for r in rows[1:]] or [
      r['train_images_per_second'] for r in rows]
  result = {
      'data_dir': args.data_dir,
      'image_size': data.image_size,
      'architecture': args.architecture,
      'epochs_run': len(rows),
      'best_epoch': best,
      'checkpoint': checkpoints.get(best) if best else None,
      'train': {'examples': summaries['train'].examples,
                'without_weather': summaries['train'].without_weather,
                'label_frequencies': summaries['train'].label_frequencies(),
                # The first epoch also traces the graph; later ones show the steady rate.
                'images_per_second': float(np.median(speeds)) if speeds else None},
      'eval': evaluation,
      'ground_thresholds': thresholds,
      'history': rows,
  }
  metrics_path = os.path.join(args.job_dir, 'metrics.json')
  # Written before the export too, so `python -m model.export --info_json` can redo a failed one.
  manifest_lib.write_json_atomic(metrics_path, result)
  exported = export_lib.export_model(model, args.export_base, export_lib.info_from_metrics(result))
  result['export'] = exported
  manifest_lib.write_json_atomic(metrics_path, result)
  manifest_lib.write_manifest(args.job_dir, {
      'stage': schema.STAGE_TRAIN,
      'inputs': {'data_dir': args.data_dir,
                 'data_manifest_sha256': manifest_lib.sha256_of_file(
                     manifest_lib.manifest_path(args.data_dir))},
      'options': {k: v for k, v in vars(args).items()},
      'counts': {'examples': dict(data.counts), 'epochs_run': len(rows)},
      'outputs': {'metrics': metrics_path, 'checkpoint': result['checkpoint'],
                  'export': exported},
      'eval_mean_f2': evaluation['mean_f2'],
      'eval_mean_f2_honest': evaluation['mean_f2_honest'],
  })
  return result


def main(argv=None):
  # Refused input or configuration (ManifestMissing, CorruptShard, OutputRefused, ...): the message
  # says what to do; a traceback would only hide it.
  command_line.run_command('train', lambda: _train_command(argv),
                           refusals=(FileNotFoundError, FileExistsError, ValueError))


def _train_command(argv):
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  args = parse_args(argv)
  result = train(args)
  print(f'train: {describe_evaluation(result["eval"])}; best epoch {result["best_epoch"]}; '
        f'exported {result["export"]}')


if __name__ == '__main__':
  main()
