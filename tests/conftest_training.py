"""Builds small preprocess outputs (shards + manifest) from sample chips, for the training tests.

Written the way beam_jobs.preprocess writes them (its image_to_example and split rule, TFRecord
shards, the manifest last), without running Beam, so the training tests stay seconds long.
Import the fixtures from here in a test module:
`from tests.conftest_training import prepared_data  # noqa: F401`.
"""
import pathlib
import shutil

import pytest

# Enough chips for a 32 px CNN to beat the prior-only baseline within a few epochs.
SAMPLE_COUNT = 400
SAMPLE_SIZE = 32
# Several test modules share one build per process: chips cost about 10 ms each to draw.
_BUILT: dict[tuple, pathlib.Path] = {}


def write_prepared(out_dir, count: int, image_size: int, seed: int = 0, shards_per_split: int = 2,
                   compression: str = 'none') -> pathlib.Path:
  """Writes OUT_DIR/sample (chips) and OUT_DIR/prep (shards + manifest.json); returns prep."""
  import numpy as np
  import tensorflow as tf
  from beam_jobs.common.labels import parse_label_file
  from beam_jobs.make_sample import make_sample
  from beam_jobs.preprocess.config import DEFAULT_EVAL_FRACTION
  from beam_jobs.preprocess.rules import assign_split, image_to_example
  from model import schema
  from model.manifest import write_manifest

  out_dir = pathlib.Path(out_dir)
  sample, prep = out_dir / 'sample', out_dir / 'prep'
  make_sample(str(sample), count=count, seed=seed)
  rows, refused = parse_label_file(str(sample / 'train_v2.csv'))
  assert not refused
  splits = {split: [] for split in schema.SPLITS}
  for name in sorted(rows):
    data = (sample / 'train-jpg' / f'{name}.jpg').read_bytes()
    record = image_to_example(rows[name], data, image_size)
    # The job's own split rule: one image in five in eval, by a hash of its name.
    splits[assign_split(name, DEFAULT_EVAL_FRACTION)].append(record)
  prep.mkdir(parents=True)
  options = tf.io.TFRecordOptions(compression_type='GZIP' if compression == 'gzip' else '')
  shards = {}
  for split, records in splits.items():
    shards[split] = []
    for index, part in enumerate(np.array_split(np.arange(len(records)), shards_per_split)):
      relative = f'{split}-{index:05d}-of-{shards_per_split:05d}.tfrecord'
      with tf.io.TFRecordWriter(str(prep / relative), options) as writer:
        for i in part:
          writer.write(records[i])
      shards[split].append(relative)
  write_manifest(str(prep), {
      'stage': schema.STAGE_PREPROCESS,
      'image_size': image_size,
      'compression': compression,
      'shards': shards,
      'counts': {'examples': {split: len(records) for split, records in splits.items()}},
  })
  return prep


def cached_prepared(tmp_path_factory, count: int, image_size: int, **kwargs) -> pathlib.Path:
  """`write_prepared` once per process for each set of arguments; treat the result as read-only."""
  key = (count, image_size, tuple(sorted(kwargs.items())))
  if key not in _BUILT:
    _BUILT[key] = write_prepared(tmp_path_factory.mktemp('prepared'), count, image_size, **kwargs)
  return _BUILT[key]


@pytest.fixture(scope='session')
def prepared_data(tmp_path_factory) -> pathlib.Path:
  """A few hundred learnable chips at 32 px, in two train and two eval shards (read-only)."""
  return cached_prepared(tmp_path_factory, count=SAMPLE_COUNT, image_size=SAMPLE_SIZE)


def copy_prepared(source: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
  """A private copy of a prepared folder, for tests that damage it."""
  shutil.copytree(source, destination)
  return destination

