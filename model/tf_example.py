"""The tf.train.Example of one labelled image: its encoder and its parse spec, side by side.

Stage 1 (beam_jobs.preprocess) encodes with `build_example`; stage 2 (model.dataset) and
model.verify_data parse with `feature_spec`. Keys and sizes: model/schema.py.

Usage:
  serialized = build_example(row, pixels, sha256_hex)       # row: name, weather, ground
  parsed = tf.io.parse_single_example(serialized, feature_spec(with_identity=True))
"""
from typing import Protocol, Sequence

import numpy as np
import tensorflow as tf

from model import schema

__all__ = ['LabelledName', 'build_example', 'feature_spec']


class LabelledName(Protocol):
  """What an Example is built from besides its pixels (beam_jobs' LabelRow is one)."""
  image_name: str
  weather: Sequence[float]   # one-hot over schema.WEATHER_LABELS, or all zeros
  ground: Sequence[float]    # multi-hot over schema.GROUND_LABELS


def build_example(row: LabelledName, pixels: np.ndarray, source_sha256: str) -> bytes:
  """Serialises one labelled image: raw uint8 pixels (decoded once, by the one decoder) + labels."""
  if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != schema.CHANNELS:
    raise ValueError(f'expected uint8 [H, W, 3] pixels, got {pixels.dtype} {pixels.shape}')
  feature = {
      schema.KEY_NAME: tf.train.Feature(bytes_list=tf.train.BytesList(value=[row.image_name.encode()])),
      schema.KEY_SHA256: tf.train.Feature(bytes_list=tf.train.BytesList(value=[source_sha256.encode()])),
      schema.KEY_PIXELS: tf.train.Feature(bytes_list=tf.train.BytesList(value=[pixels.tobytes()])),
      schema.KEY_SHAPE: tf.train.Feature(int64_list=tf.train.Int64List(value=list(pixels.shape))),
      schema.KEY_WEATHER: tf.train.Feature(float_list=tf.train.FloatList(value=row.weather)),
      schema.KEY_GROUND: tf.train.Feature(float_list=tf.train.FloatList(value=row.ground)),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def feature_spec(with_identity: bool = False) -> dict:
  """The parse spec of `build_example`'s Examples; `with_identity` adds the name and sha256
  (training does not need them, so it does not pay for parsing them)."""
  spec = {
      schema.KEY_PIXELS: tf.io.FixedLenFeature([], tf.string),
      schema.KEY_SHAPE: tf.io.FixedLenFeature([3], tf.int64),
      schema.KEY_WEATHER: tf.io.FixedLenFeature([schema.NUM_WEATHER], tf.float32),
      schema.KEY_GROUND: tf.io.FixedLenFeature([schema.NUM_GROUND], tf.float32),
  }
  if with_identity:
    spec[schema.KEY_NAME] = tf.io.FixedLenFeature([], tf.string)
    spec[schema.KEY_SHA256] = tf.io.FixedLenFeature([], tf.string)
  return spec
