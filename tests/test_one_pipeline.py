"""One pipeline on every runner: the same input and flags give the same shard files, holding the
same records, whatever the cores, the worker count or the local mode. (The portable runner is
held to the same in tests/test_portable_runner.py.)"""
import json

import pytest
import tensorflow as tf

from beam_jobs import preprocess
from beam_jobs.make_sample import make_sample
from model import schema

# Rows enough for the job to choose 3 train shards at 128 px (rules.estimate_num_shards): a count
# that no worker count of 2 divides, where the old rule rounded it up to 4 on 2 cores.
CSV_ROWS = 12_000
IMAGES = 150
MODES = {
    'one worker (threads)': ['--direct_num_workers=1'],
    'default (encoder processes, one per core)': [],
    'three encoder processes': ['--direct_num_workers=3'],
    'encoder threads': ['--encoder_processes=0'],
    "Beam's worker processes": ['--direct_running_mode=multi_processing',
                                '--direct_num_workers=2'],
}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """150 chips and a CSV of 12,000 rows: the chips' and 11,850 without images (MISSING_IMAGE)."""
  root = tmp_path_factory.mktemp('one_pipeline')
  make_sample(str(root / 'sample'), count=IMAGES, seed=25)
  rows = (root / 'sample' / 'train_v2.csv').read_text().splitlines()
  rows += [f'absent_{i:05d},clear primary' for i in range(CSV_ROWS - IMAGES)]
  (root / 'labels.csv').write_text('\n'.join(rows) + '\n')
  return root


def _shards(out, manifest) -> dict[str, list[bytes]]:
  return {shard: sorted(r.numpy() for r in tf.data.TFRecordDataset(str(out / shard)))
          for split in schema.SPLITS for shard in manifest['shards'][split]}


@pytest.mark.slow
def test_every_local_mode_writes_the_same_shards(data, tmp_path):
  written = {}
  for mode, flags in MODES.items():
    out = tmp_path / str(len(written))
    outcome = preprocess.run(['--labels_csv', str(data / 'labels.csv'),
                              '--images_dir', str(data / 'sample' / 'train-jpg'),
                              '--output_dir', str(out), '--image_size', '128',
                              '--max_bad_fraction', '1', *flags])
    manifest = outcome.manifest
    written[mode] = (manifest['options']['num_shards'], _shards(out, manifest),
                     manifest['counts'], json.dumps(manifest['label_counts'], sort_keys=True))
  first = written['default (encoder processes, one per core)']
  assert first[0] == {'train': 3, 'eval': 1}            # from the data, not from the cores
  assert sum(len(records) for records in first[1].values()) == IMAGES
  assert all(len(first[1][f'train/part-0000{i}-of-00003.tfrecord']) for i in range(3))
  for mode, outputs in written.items():
    assert outputs == first, mode


@pytest.mark.parametrize('flags,words', [
    (['--encoder_processes', '-1'], '--encoder_processes must be 0 or more'),
    (['--encoder_processes', '2', '--output_dir', 'gs://bucket/out'],
     '--encoder_processes needs local --images_dir and --output_dir'),
])
def test_encoder_processes_flag_is_checked_before_anything_runs(tmp_path, flags, words):
  argv = ['--labels_csv', str(tmp_path / 'x.csv'), '--images_dir', str(tmp_path),
          '--output_dir', str(tmp_path / 'out'), *flags]
  with pytest.raises(preprocess.ConfigError, match=words):
    preprocess.validate_config(preprocess.parse_args(argv)[0])
  assert not (tmp_path / 'out').exists()
