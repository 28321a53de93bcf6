"""The model a training run fits: a new network compiled with the two heads' losses, or the
newest checkpoint of an earlier run with its optimizer; a preset's backbone frozen or not.

Usage:
  model, epochs_done = restore_or_build(args, image_size=128)
  set_backbone_frozen(model, frozen=False, learning_rate=1e-4)
  checkpoints = list_checkpoints(job_dir)   # {epoch: path}
"""
import argparse
import importlib
import logging
import os
import re
from typing import Callable

import tensorflow as tf
import keras

from model import network
from model import schema

__all__ = ['CHECKPOINT_PATTERN', 'checkpoint_dir', 'compile_model', 'DEFAULT_ARCHITECTURE',
           'list_checkpoints', 'load_architecture', 'restore_or_build', 'set_backbone_frozen']

DEFAULT_ARCHITECTURE = 'model.network:tutorial_cnn'
CHECKPOINT_PATTERN = 'epoch_{epoch:03d}.keras'
_CHECKPOINT_RE = re.compile(r'^epoch_(\d+)\.keras$')


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
