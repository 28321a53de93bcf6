"""Builds the tf.train.Example that stage 1 writes and stage 2 reads (keys: model/schema.py)."""
import numpy as np
import tensorflow as tf

from beam_jobs.labels import LabelRow
from model import schema


def build_example(row: LabelRow, pixels: np.ndarray, source_sha256: str) -> bytes:
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
