"""The tf.train.Example of one labelled image: its encoder and its parse spec, side by side.

Stage 1 (beam_jobs.preprocess) encodes with `build_example`; stage 2 (model.dataset) and
model.verify_data parse with `feature_spec`. Keys and sizes: model/schema.py.

Usage:
  serialized = build_example(row, pixels, sha256_hex)       # row: name, weather, ground
  parsed = tf.io.parse_single_example(serialized, feature_spec(with_identity=True))
"""
import functools
import struct
from typing import Protocol, Sequence

import numpy as np

from model import schema

__all__ = ['LabelledName', 'build_example', 'feature_spec']


class LabelledName(Protocol):
  """What an Example is built from besides its pixels (beam_jobs' LabelRow is one)."""
  image_name: str
  weather: Sequence[float]   # one-hot over schema.WEATHER_LABELS, or all zeros
  ground: Sequence[float]    # multi-hot over schema.GROUND_LABELS


def build_example(row: LabelledName, pixels: np.ndarray, source_sha256: str) -> bytes:
  """Serialises one labelled image: raw uint8 pixels (decoded once, by the one decoder) + labels.

  Written straight in protobuf's wire format rather than through `tf.train.Example`, so that
  preprocess workers never import TensorFlow (seconds of CPU and hundreds of MB in every worker
  process) and the pixels are copied once. The bytes parse as the same `tf.train.Example` as the
  message built field by field (tests/test_tf_example.py checks it against TensorFlow's own).
  """
  if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != schema.CHANNELS:
    raise ValueError(f'expected uint8 [H, W, 3] pixels, got {pixels.dtype} {pixels.shape}')
  parts: list[bytes] = []
  _add_feature(parts, schema.KEY_NAME, _BYTES_LIST, row.image_name.encode())
  _add_feature(parts, schema.KEY_SHA256, _BYTES_LIST, source_sha256.encode())
  _add_feature(parts, schema.KEY_PIXELS, _BYTES_LIST, pixels.tobytes())
  # The shape and the labels take few values across a data set: each entry is encoded once.
  parts.append(_small_feature(schema.KEY_SHAPE, _INT64_LIST,
                              b''.join(_varint(int(d)) for d in pixels.shape)))
  parts.append(_small_feature(schema.KEY_WEATHER, _FLOAT_LIST, _floats(row.weather)))
  parts.append(_small_feature(schema.KEY_GROUND, _FLOAT_LIST, _floats(row.ground)))
  # Example { Features features = 1; }
  return b''.join([_header(1, sum(map(len, parts))), *parts])


# The wire format of tensorflow/core/example/{example,feature}.proto:
#   Features { map<string, Feature> feature = 1; }  (a map entry: string key = 1; Feature value = 2)
#   Feature { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
#                          Int64List int64_list = 3; } }
#   BytesList { repeated bytes value = 1; }    (here: one value)
#   FloatList { repeated float value = 1 [packed = true]; }
#   Int64List { repeated int64 value = 1 [packed = true]; }
# so each list is field 1, length-delimited, of its list message.
_BYTES_LIST, _FLOAT_LIST, _INT64_LIST = 1, 2, 3


def _varint(value: int) -> bytes:
  out = bytearray()
  while value > 0x7f:
    out.append(value & 0x7f | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


@functools.lru_cache(maxsize=4096)
def _header(field: int, size: int) -> bytes:
  """The tag (wire type 2, length-delimited) and length of a field of `size` bytes. Cached: an
  Example's headers take the same few sizes image after image (the pixels' size is fixed)."""
  return _varint(field << 3 | 2) + _varint(size)


def _floats(values: Sequence[float]) -> bytes:
  return struct.pack(f'<{len(values)}f', *values)


def _add_feature(parts: list[bytes], key: str, kind: int, payload: bytes) -> None:
  """Appends one map entry of Features.feature whose list holds `payload` (headers computed from
  the sizes, so the payload itself is copied once, by the caller's join)."""
  list_header = _header(1, len(payload))
  feature_header = _header(kind, len(list_header) + len(payload))
  feature_size = len(feature_header) + len(list_header) + len(payload)
  key_field = key.encode()
  key_header = _header(1, len(key_field))
  value_header = _header(2, feature_size)
  entry_size = len(key_header) + len(key_field) + len(value_header) + feature_size
  parts += [_header(1, entry_size), key_header, key_field, value_header, feature_header,
            list_header, payload]


@functools.lru_cache(maxsize=4096)
def _small_feature(key: str, kind: int, payload: bytes) -> bytes:
  """The whole map entry of a feature with a small payload (`_add_feature`'s parts, joined)."""
  parts: list[bytes] = []
  _add_feature(parts, key, kind, payload)
  return b''.join(parts)


def feature_spec(with_identity: bool = False) -> dict:
  """The parse spec of `build_example`'s Examples; `with_identity` adds the name and sha256
  (training does not need them, so it does not pay for parsing them)."""
  # Imported here: the encoder above is used where TensorFlow is not loaded (preprocess workers).
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
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
