"""The callbacks of model.train's fit: JOB/history.json, TensorBoard scalars, and early stopping
that carries on across --resume.

Usage:
  history = EpochHistory(job_dir, read_history(job_dir), images_per_epoch)
  model.fit(..., callbacks=[history, EpochSummaries(os.path.join(job_dir, 'logs')),
                            ResumableEarlyStopping(patience, history.rows)])
"""
import json
import os
import time

import numpy as np
import tensorflow as tf
import keras
from tensorflow.core.framework import summary_pb2

from model import manifest as manifest_lib

__all__ = ['EpochHistory', 'EpochSummaries', 'read_history', 'ResumableEarlyStopping']


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
