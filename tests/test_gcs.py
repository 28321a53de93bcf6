"""Every path on gs://: preprocess and predict (in-process and gRPC) against a GCS emulator on
loopback give the outputs of the same runs on local folders.

The emulator (gcp-storage-emulator) serves Google Cloud Storage's JSON API; google-cloud-storage,
which Beam's GCS file system uses, sends every request there when STORAGE_EMULATOR_HOST is set.
Beam asks google-auth for credentials first, and with none it retries for about 25 s before it
connects anonymously; a credentials file holding a token that never expires makes that instant
(the emulator ignores the token, and nothing is ever refreshed over the network).

TensorFlow's own GCS file system cannot reach an emulator: it sends every request to
https://www.googleapis.com/storage/v1/ (tsl/platform/cloud/gcs_file_system.cc, kGcsUriBase) and
reads no STORAGE_EMULATOR_HOST. So the model folders stay local here, and training's gs:// input
is tested as far as Beam's file system takes it: the manifest and its shard paths.
"""
import json
import logging
import socket

import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems

from beam_jobs import make_sample, predict, preprocess
from model import dataset, schema
from tests.conftest import PREDICT_IMAGE_SIZE

BUCKET = 'planet-test'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """gs://planet-test on an emulator on loopback, for this module's tests; yields 'gs://BUCKET'."""
  from gcp_storage_emulator.server import create_server
  credentials = tmp_path_factory.mktemp('gcs') / 'emulator-credentials.json'
  credentials.write_text(json.dumps({
      'type': 'authorized_user', 'client_id': 'emulator', 'client_secret': 'emulator',
      'refresh_token': 'emulator', 'token': 'emulator', 'expiry': '2999-01-01T00:00:00Z'}))
  # Its 'content handled as string' warnings are about the emulator, not the jobs.
  logging.getLogger('gcp_storage_emulator').setLevel(logging.ERROR)
  port = _free_port()
  server = create_server('127.0.0.1', port, in_memory=True, default_bucket=BUCKET)
  server.start()
  with pytest.MonkeyPatch.context() as env:
    env.setenv('STORAGE_EMULATOR_HOST', f'http://127.0.0.1:{port}')
    env.setenv('GOOGLE_APPLICATION_CREDENTIALS', str(credentials))
    env.setenv('GOOGLE_CLOUD_PROJECT', 'emulated-project')
    env.setenv('NO_GCE_CHECK', 'true')   # never look for a metadata server
    yield f'gs://{BUCKET}'
  server.stop()


def _read(path: str) -> bytes:
  with FileSystems.open(path) as f:
    return f.read()


def _files(folder: str) -> dict[str, bytes]:
  """Every file under a local or gs:// folder, by its path relative to the folder."""
  found = FileSystems.match([FileSystems.join(folder, '**')])[0].metadata_list
  prefix = folder.rstrip('/') + '/'
  return {m.path[len(prefix):]: _read(m.path) for m in found}


def _tfrecords(data: bytes) -> list[bytes]:
  """The records of an uncompressed TFRecord file (length, length CRC, data, data CRC)."""
  records, position = [], 0
  while position < len(data):
    length = int.from_bytes(data[position:position + 8], 'little')
    records.append(data[position + 12:position + 12 + length])
    position += 12 + length + 4
  return records


def _jsonl(files: dict[str, bytes], prefix: str, drop=('path',)) -> list[dict]:
  rows = [json.loads(line) for name, data in files.items() if name.startswith(prefix)
          for line in data.decode().splitlines() if line.strip()]
  return sorted(({k: v for k, v in row.items() if k not in drop} for row in rows),
                key=lambda row: json.dumps(row, sort_keys=True))


def _probabilities(files: dict[str, bytes]) -> dict[str, np.ndarray]:
  rows = _jsonl(files, schema.PREDICTIONS_PREFIX, drop=())
  return {row['image_name']: np.array([row['weather'][label] for label in schema.WEATHER_LABELS]
                                      + [row['ground'][label] for label in schema.GROUND_LABELS])
          for row in rows}


@pytest.fixture(scope='module')
def samples(gcs, tmp_path_factory):
  """The same generated chips locally and on gs:// (make_sample writes through FileSystems), plus
  an empty and a non-image file among the images to predict: {'local': root, 'gs': root}."""
  local = str(tmp_path_factory.mktemp('local_samples'))
  roots = {'local': local, 'gs': f'{gcs}/samples'}
  for root in roots.values():
    make_sample.make_sample(FileSystems.join(root, 'train'), count=40, seed=3)
    make_sample.make_sample(FileSystems.join(root, 'holdout'), count=12, seed=4, prefix='holdout')
    for name, data in (('empty.jpg', b''), ('notes.jpg', b'not pixels')):
      with FileSystems.create(FileSystems.join(root, 'holdout', 'train-jpg', name)) as f:
        f.write(data)
  return roots


@pytest.fixture(scope='module')
def prepared(samples):
  """The preprocess job on each root: {'local': (out, manifest), 'gs': (out, manifest)}."""
  runs = {}
  for where, root in samples.items():
    out = FileSystems.join(root, 'prep')
    manifest = preprocess.run([
        '--labels_csv', FileSystems.join(root, 'train', 'train_v2.csv'),
        '--images_dir', FileSystems.join(root, 'train', 'train-jpg'), '--output_dir', out,
        '--image_size', str(PREDICT_IMAGE_SIZE)]).manifest
    runs[where] = out, manifest
  return runs


def test_preprocess_on_gcs_writes_what_it_writes_locally(prepared):
  (local_out, local), (gcs_out, remote) = prepared['local'], prepared['gs']
  assert gcs_out.startswith('gs://')
  for key in ('counts', 'label_counts', 'shards', 'image_size', 'compression'):
    assert remote[key] == local[key], key
  assert remote['counts']['csv_rows'] == 40
  assert remote['inputs']['labels_csv_sha256'] == local['inputs']['labels_csv_sha256']
  local_files, gcs_files = _files(local_out), _files(gcs_out)
  assert sorted(gcs_files) == sorted(local_files)
  for name in remote['shards']['train'] + remote['shards']['eval']:
    assert sorted(_tfrecords(gcs_files[name])) == sorted(_tfrecords(local_files[name])), name
  assert json.loads(gcs_files[schema.COUNTS_FILE]) == json.loads(local_files[schema.COUNTS_FILE])


def test_training_input_resolves_its_gcs_shards_through_the_manifest(prepared):
  # As far as Beam's file system goes: TensorFlow's cannot reach the emulator (module docstring).
  gcs_out, remote = prepared['gs']
  data = dataset.load_prepared(gcs_out, require_shards=False)
  assert data.image_size == PREDICT_IMAGE_SIZE
  for split in schema.SPLITS:
    assert data.shards[split] == tuple(f'{gcs_out}/{p}' for p in remote['shards'][split])
    assert all(FileSystems.exists(path) for path in data.shards[split])
  assert dict(data.counts) == remote['counts']['examples']


def _predict(root: str, out_name: str, export_base, *backend) -> tuple[str, dict]:
  out = FileSystems.join(root, out_name)
  summary = predict.run([
      '--input', FileSystems.join(root, 'holdout', 'train-jpg'), '--output_dir', out,
      '--labels_csv', FileSystems.join(root, 'holdout', 'train_v2.csv'),
      # The model is read by TensorFlow, which cannot reach the emulator: a local folder.
      '--model_dir', str(export_base / 'PlanetModel'), '--max_bad_fraction', '0.3', *backend])
  return out, summary


@pytest.mark.parametrize('backend', ['in_process', 'grpc'])
def test_predict_on_gcs_writes_what_it_writes_locally(samples, export_base, server, backend):
  extra = ('--serving_address', server.address) if backend == 'grpc' else ()
  (local_out, local), (gcs_out, remote) = (
      _predict(samples[where], f'predict_{backend}', export_base, *extra)
      for where in ('local', 'gs'))
  assert gcs_out.startswith('gs://') and remote['backend'] == local['backend'] == backend
  assert remote['counts'] == local['counts'] == {
      'images_matched': 14, 'predictions': 12, 'dead_letters': 2}
  assert ({k: v for k, v in remote['evaluation'].items() if k != 'labels_csv'}
          == {k: v for k, v in local['evaluation'].items() if k != 'labels_csv'})
  local_files, gcs_files = _files(local_out), _files(gcs_out)
  assert sorted(gcs_files) == sorted(local_files)
  gcs_rows = _jsonl(gcs_files, schema.PREDICTIONS_PREFIX, drop=('path', 'weather', 'ground'))
  assert gcs_rows == _jsonl(local_files, schema.PREDICTIONS_PREFIX,
                            drop=('path', 'weather', 'ground'))
  # Batches form in another order, and oneDNN's float sums with them: equal to rounding.
  gcs_heads, local_heads = (_probabilities(files) for files in (gcs_files, local_files))
  assert gcs_heads.keys() == local_heads.keys() and len(gcs_heads) == 12
  assert max(abs(gcs_heads[name] - local_heads[name]).max() for name in local_heads) < 1e-6
  assert (_jsonl(gcs_files, schema.DEAD_LETTERS_DIR, drop=('path', 'message'))
          == _jsonl(local_files, schema.DEAD_LETTERS_DIR, drop=('path', 'message')))
  assert gcs_files[schema.SUBMISSION_FILE] == local_files[schema.SUBMISSION_FILE]
  manifest = json.loads(gcs_files[schema.MANIFEST_FILE])
  assert manifest['counts']['predictions'] == 12
  assert set(manifest['outputs']) <= set(gcs_files)
