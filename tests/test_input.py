"""The training input: manifest checks, parsing, augmentation, and shards that fail by name."""
import collections
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from model.tf_example import build_example, feature_spec
from beam_jobs.common.labels import LabelRow
from model import dataset as dataset_lib
from model import schema
from model.manifest import ManifestMissing, write_manifest
from tests.conftest_training import SAMPLE_SIZE, copy_prepared, prepared_data  # noqa: F401 (fixture)

SIZE = 4


def _row(name, weather_index=None, ground_indices=()):
  weather = [0.0] * schema.NUM_WEATHER
  if weather_index is not None:
    weather[weather_index] = 1.0
  ground = [1.0 if i in ground_indices else 0.0 for i in range(schema.NUM_GROUND)]
  return LabelRow(name, tuple(weather), tuple(ground))


def _pixels(seed, size=SIZE):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _write_data(directory, train_records, eval_records, size=SIZE, compression='none'):
  """A tiny preprocess output from given serialized records: one shard per split."""
  options = tf.io.TFRecordOptions(compression_type='GZIP' if compression == 'gzip' else '')
  for split, records in (('train', train_records), ('eval', eval_records)):
    with tf.io.TFRecordWriter(str(directory / f'{split}.tfrecord'), options) as writer:
      for record in records:
        writer.write(record)
  write_manifest(str(directory), {
      'stage': 'preprocess', 'image_size': size, 'compression': compression,
      'shards': {'train': ['train.tfrecord'], 'eval': ['eval.tfrecord']},
      'counts': {'examples': {'train': len(train_records), 'eval': len(eval_records)}}})
  return directory


def test_parse_batch_restores_pixels_labels_and_masks_missing_weather():
  rows = [_row('a', 0, (8, 12)), _row('b', None, (12,)), _row('c', 3, ())]
  pixels = [_pixels(i) for i in range(3)]
  serialized = tf.constant([build_example(r, p, 'ab' * 32) for r, p in zip(rows, pixels)])
  images, targets, weights = dataset_lib.parse_batch(serialized, SIZE)
  assert images.dtype == tf.uint8
  np.testing.assert_array_equal(images.numpy(), np.stack(pixels))
  np.testing.assert_array_equal(targets['weather'].numpy(), [r.weather for r in rows])
  np.testing.assert_array_equal(targets['ground'].numpy(), [r.ground for r in rows])
  # The row with no weather tag teaches the weather head nothing; every row teaches ground.
  np.testing.assert_array_equal(weights['weather'].numpy(), [1.0, 0.0, 1.0])
  np.testing.assert_array_equal(weights['ground'].numpy(), [1.0, 1.0, 1.0])


def test_parse_batch_refuses_a_record_of_another_size():
  serialized = tf.constant([build_example(_row('a', 0), _pixels(0, SIZE + 1), 'ab' * 32)])
  with pytest.raises(tf.errors.InvalidArgumentError):
    dataset_lib.parse_batch(serialized, SIZE)


def _dihedral(image):
  """The 8 flips/rotations of a square image."""
  variants = []
  for k in range(4):
    rotated = np.rot90(image, k)
    variants += [rotated, rotated[:, ::-1]]
  return variants


def test_augment_batch_draws_every_square_symmetry_and_nothing_else():
  tf.random.set_seed(1)
  image = np.arange(SIZE * SIZE * 3, dtype=np.uint8).reshape(SIZE, SIZE, 3)
  variants = [v.tobytes() for v in _dihedral(image)]
  assert len(set(variants)) == 8
  assert dataset_lib.augment_batch(tf.constant(image[None])).shape == (1, SIZE, SIZE, 3)
  out = dataset_lib.augment_batch(tf.constant(np.stack([image] * 400))).numpy()
  seen = [variants.index(chip.tobytes()) for chip in out]   # .index raises if not a symmetry
  counts = np.bincount(seen, minlength=8)
  assert counts.min() > 25, counts   # all 8, each about 50 times


def test_load_prepared_refuses_a_folder_without_manifest(tmp_path):
  (tmp_path / 'train.tfrecord').write_bytes(b'')
  with pytest.raises(ManifestMissing, match='has no manifest.json: the stage that writes it did not finish'):
    dataset_lib.load_prepared(str(tmp_path))


def test_load_prepared_refuses_another_image_size_and_missing_shards(tmp_path):
  data_dir = _write_data(tmp_path, [build_example(_row('a', 0), _pixels(0), 'ab' * 32)],
                         [build_example(_row('b', 0), _pixels(1), 'ab' * 32)])
  assert dataset_lib.load_prepared(str(data_dir), SIZE).image_size == SIZE
  with pytest.raises(ValueError, match=f'holds {SIZE}x{SIZE} pixels but --image_size is 8'):
    dataset_lib.load_prepared(str(data_dir), 8)
  (data_dir / 'eval.tfrecord').unlink()
  with pytest.raises(FileNotFoundError, match='eval.tfrecord'):
    dataset_lib.load_prepared(str(data_dir))


def test_load_prepared_refuses_another_stage(tmp_path):
  write_manifest(str(tmp_path), {'stage': 'predict'})
  with pytest.raises(ValueError, match="stage 'predict', not 'preprocess'"):
    dataset_lib.load_prepared(str(tmp_path))


def test_eval_is_one_pass_in_a_fixed_order_and_train_an_endless_reshuffled_stream(prepared_data):
  data = dataset_lib.load_prepared(str(prepared_data))
  in_files = []
  for path in data.shards['eval']:
    for record in tf.data.TFRecordDataset(path):
      in_files.append(tf.io.parse_single_example(record, feature_spec())[schema.KEY_PIXELS].numpy())
  evaluation = dataset_lib.make_dataset(data, 'eval', 16, training=False)
  pass_1 = [c.tobytes() for b in evaluation for c in b[0].numpy()]
  pass_2 = [c.tobytes() for b in evaluation for c in b[0].numpy()]
  assert pass_1 == pass_2 and sorted(pass_1) == sorted(in_files)

  train = dataset_lib.make_dataset(data, 'train', 16, training=True, augment=False, shuffle_buffer=64)
  steps = dataset_lib.steps_per_epoch(data, 'train', 16)
  assert steps == math.ceil(data.counts['train'] / 16)
  # An endless stream: three epochs' worth show every chip about three times (epochs blur by up
  # to a shuffle buffer), in a new order each epoch.
  chips = [c.tobytes() for b in train.take(3 * steps) for c in b[0].numpy()]
  counts = collections.Counter(chips)
  assert len(counts) == data.counts['train'] and min(counts.values()) >= 2 and max(counts.values()) <= 4
  epoch_1, epoch_2 = chips[:data.counts['train']], chips[data.counts['train']:2 * data.counts['train']]
  assert epoch_1 != epoch_2 and len(set(epoch_1)) > 0.8 * len(epoch_1)


def test_verify_shards_counts_labels(tmp_path):
  rows = [_row('a', 0, (8,)), _row('b', None, (8, 12)), _row('c', 1, ())]
  data_dir = _write_data(tmp_path, [build_example(r, _pixels(i), 'ab' * 32) for i, r in enumerate(rows)],
                         [build_example(_row('d', 2), _pixels(9), 'ab' * 32)], compression='gzip')
  summaries = dataset_lib.verify_shards(dataset_lib.load_prepared(str(data_dir)))
  train = summaries['train']
  assert (train.examples, train.without_weather) == (3, 1)
  frequencies = train.label_frequencies()
  assert frequencies['primary'] == pytest.approx(2 / 3) and frequencies['water'] == pytest.approx(1 / 3)
  assert frequencies['clear'] == pytest.approx(1 / 3) and frequencies['haze'] == 0.0
  assert summaries['eval'].examples == 1


@pytest.mark.parametrize('damage', ['truncate', 'flip_byte', 'wrong_size_record', 'gzip_truncate'])
def test_a_damaged_shard_fails_fast_naming_the_file(tmp_path, damage):
  records = [build_example(_row(f'r{i}', 0), _pixels(i), 'ab' * 32) for i in range(50)]
  if damage == 'wrong_size_record':
    records[30] = build_example(_row('odd', 0), _pixels(99, SIZE * 2), 'ab' * 32)
  compression = 'gzip' if damage.startswith('gzip') else 'none'
  data_dir = _write_data(tmp_path, records, records[:5], compression=compression)
  shard = data_dir / 'train.tfrecord'
  raw = bytearray(shard.read_bytes())
  if damage in ('truncate', 'gzip_truncate'):
    shard.write_bytes(bytes(raw[:len(raw) * 2 // 3]))
  elif damage == 'flip_byte':
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
  data = dataset_lib.load_prepared(str(data_dir))
  with pytest.raises(dataset_lib.CorruptShard, match=str(shard)) as refused:
    dataset_lib.verify_shards(data)
  assert 'run the preprocess job again' in str(refused.value)
  assert dataset_lib.find_corrupt_shard(data) is not None


def test_verify_shards_refuses_counts_that_differ_from_the_manifest(tmp_path, prepared_data):
  data_dir = copy_prepared(prepared_data, tmp_path / 'prep')
  manifest = json.loads((data_dir / 'manifest.json').read_text())
  manifest['counts']['examples']['eval'] += 1
  (data_dir / 'manifest.json').write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match='the eval shards .* hold \\d+ examples but its manifest records'):
    dataset_lib.verify_shards(dataset_lib.load_prepared(str(data_dir)))
  assert SAMPLE_SIZE == dataset_lib.load_prepared(str(data_dir)).image_size
