"""Both jobs on Beam's PortableRunner with an external SDK worker pool: the Fn API path that
Dataflow Runner v2, Flink and Spark run, and the closest to Dataflow that runs here. Each job's
output there must equal its DirectRunner output: the same Examples in the same shards, the same
predictions (`compare_predictions`)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from beam_jobs.make_sample import make_sample
from model import schema
from tests.conftest import REPO
from tests.test_trusted_outputs import _command

SHARDS = 3   # more than one shard per split: records must land in the same shard on both runners


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def worker_pool():
  """An external SDK worker pool on loopback (`worker_pool_main`), started with this venv's
  python first on PATH, since the pool starts each worker as plain `python`."""
  port = _free_port()
  env = {**os.environ, 'PATH': f'{os.path.dirname(sys.executable)}:{os.environ["PATH"]}',
         'PYTHONPATH': str(REPO)}
  pool = subprocess.Popen(
      [sys.executable, '-m', 'apache_beam.runners.worker.worker_pool_main',
       f'--service_port={port}'], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL, start_new_session=True)
  deadline = time.monotonic() + 60
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      break
    except OSError:
      assert pool.poll() is None and time.monotonic() < deadline, 'the worker pool did not start'
      time.sleep(0.2)
  yield ['--runner=PortableRunner', '--job_endpoint=embed', '--environment_type=EXTERNAL',
         f'--environment_config=localhost:{port}']
  os.killpg(pool.pid, 15)   # the pool and the workers it started
  pool.wait(timeout=30)


@pytest.fixture(scope='module')
def sample(tmp_path_factory):
  root = tmp_path_factory.mktemp('portable') / 'sample'
  make_sample(str(root), count=150, seed=24)
  return root


def _examples_by_shard(out) -> dict[str, list[bytes]]:
  manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
  shards = {}
  for split in schema.SPLITS:
    for shard in manifest['shards'][split]:
      records = [r.numpy() for r in tf.data.TFRecordDataset(str(out / shard))]
      shards[shard] = sorted(records)   # the record order inside a shard may differ
  return shards


@pytest.mark.slow
def test_preprocess_on_the_portable_runner_writes_the_direct_runners_shards(
    sample, worker_pool, tmp_path):
  outputs = {}
  for runner, flags in (('direct', []), ('portable', worker_pool)):
    out = tmp_path / runner
    done = _command('beam_jobs.preprocess', [
        '--labels_csv', str(sample / 'train_v2.csv'), '--images_dir', str(sample / 'train-jpg'),
        '--output_dir', str(out), '--image_size', '32', '--num_shards', str(SHARDS), *flags])
    assert done.returncode == 0, done.stderr[-3000:]
    outputs[runner] = out
  direct, portable = (_examples_by_shard(outputs[r]) for r in ('direct', 'portable'))
  assert len(direct) == 2 * SHARDS and sum(map(len, direct.values())) == 150
  assert direct == portable
  counts = [json.loads((outputs[r] / schema.MANIFEST_FILE).read_text())['counts']
            for r in ('direct', 'portable')]
  assert counts[0] == counts[1]


@pytest.mark.slow
def test_predict_on_the_portable_runner_gives_the_direct_runners_predictions(
    sample, worker_pool, export_base, tmp_path):
  for runner, flags in (('direct', []), ('portable', worker_pool)):
    done = _command('beam_jobs.predict', [
        '--input', str(sample / 'train-jpg'), '--output_dir', str(tmp_path / runner),
        '--model_dir', str(export_base / 'PlanetModel'),
        '--labels_csv', str(sample / 'train_v2.csv'), *flags])
    assert done.returncode == 0, done.stderr[-3000:]
  compared = _command('beam_jobs.compare_predictions',
                      [str(tmp_path / 'direct'), str(tmp_path / 'portable')])
  assert compared.returncode == 0, compared.stdout + compared.stderr
  assert 'agree on 150 predictions' in compared.stdout, compared.stdout
