"""The Example encoder writes protobuf's wire format itself: it must parse as TensorFlow's own."""
import numpy as np
import pytest
import tensorflow as tf

from beam_jobs.common.labels import LabelRow
from model import schema
from model.tf_example import build_example, feature_spec


def _tensorflow_example(row: LabelRow, pixels: np.ndarray, sha256: str) -> tf.train.Example:
  """The same Example built field by field with TensorFlow's message classes."""
  def feature(**kind):
    return tf.train.Feature(**kind)
  return tf.train.Example(features=tf.train.Features(feature={
      schema.KEY_NAME: feature(bytes_list=tf.train.BytesList(value=[row.image_name.encode()])),
      schema.KEY_SHA256: feature(bytes_list=tf.train.BytesList(value=[sha256.encode()])),
      schema.KEY_PIXELS: feature(bytes_list=tf.train.BytesList(value=[pixels.tobytes()])),
      schema.KEY_SHAPE: feature(int64_list=tf.train.Int64List(value=list(pixels.shape))),
      schema.KEY_WEATHER: feature(float_list=tf.train.FloatList(value=row.weather)),
      schema.KEY_GROUND: feature(float_list=tf.train.FloatList(value=row.ground)),
  }))


def _row(name: str, weather: int | None, ground: tuple[int, ...]) -> LabelRow:
  one_hot = tuple(float(i == weather) for i in range(schema.NUM_WEATHER))
  multi_hot = tuple(float(i in ground) for i in range(schema.NUM_GROUND))
  return LabelRow(name, one_hot, multi_hot)


CASES = [
    (_row('train_0', 0, (0, 2, 12)), (128, 128, 3)),
    (_row('=1,2 "x"\nété', None, ()), (1, 1, 3)),            # no weather; a hostile name
    (_row('n' * 300, 3, tuple(range(13))), (300, 200, 3)),   # multi-byte lengths everywhere
]


@pytest.mark.parametrize('row,shape', CASES)
def test_the_bytes_parse_as_tensorflows_own_example(row, shape):
  rng = np.random.default_rng(len(row.image_name))
  pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
  sha256 = 'ab' * 32
  ours = tf.train.Example.FromString(build_example(row, pixels, sha256))
  assert ours == _tensorflow_example(row, pixels, sha256)


def test_tensorflows_parser_reads_back_pixels_shape_labels_and_identity():
  row, shape = CASES[0]
  pixels = np.arange(np.prod(shape), dtype=np.int64).astype(np.uint8).reshape(shape)
  parsed = tf.io.parse_single_example(build_example(row, pixels, 'cd' * 32),
                                      feature_spec(with_identity=True))
  np.testing.assert_array_equal(
      tf.io.decode_raw(parsed[schema.KEY_PIXELS], tf.uint8).numpy().reshape(shape), pixels)
  assert parsed[schema.KEY_SHAPE].numpy().tolist() == list(shape)
  assert parsed[schema.KEY_WEATHER].numpy().tolist() == list(row.weather)
  assert parsed[schema.KEY_GROUND].numpy().tolist() == list(row.ground)
  assert parsed[schema.KEY_NAME].numpy() == row.image_name.encode()
  assert parsed[schema.KEY_SHA256].numpy() == b'cd' * 32


def test_only_uint8_rgb_pixels_are_encoded():
  row, _ = CASES[0]
  with pytest.raises(ValueError, match='uint8'):
    build_example(row, np.zeros((4, 4, 3), np.float32), 'ab' * 32)
  with pytest.raises(ValueError, match='uint8'):
    build_example(row, np.zeros((4, 4), np.uint8), 'ab' * 32)
