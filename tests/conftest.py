"""Shared fixtures: real Planet chips from ../shared/planet (skipped where absent), sample data."""
import glob
import json
import os
import pathlib
import shutil

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

REPO = pathlib.Path(__file__).resolve().parent.parent
PLANET_DIR = REPO.parent / 'shared' / 'planet'
PREDICT_IMAGE_SIZE = 64
# A Dataflow job built offline: Beam translates the graph and builds the worker package from
# ./setup.py (run from the repository root) without contacting the service. Bucket names must be
# valid, or Beam tries to create a default bucket over the network.
DATAFLOW_DRY_RUN_ARGS = [
    '--runner=DataflowRunner', '--dry_run=True', '--no_auth', '--project=my-project',
    '--region=us-central1', '--temp_location=gs://my-bucket/tmp',
    '--staging_location=gs://my-bucket/staging', '--setup_file=./setup.py']


def read_jsonl(pattern):
  return [json.loads(line) for path in sorted(glob.glob(str(pattern)))
          for line in open(path) if line.strip()]


@pytest.fixture(scope='session')
def planet_dir() -> pathlib.Path:
  """The real sample of Planet data; tests that need it skip where it is absent."""
  if not (PLANET_DIR / 'train-jpg').is_dir():
    pytest.skip(f'real Planet data not found at {PLANET_DIR}')
  return PLANET_DIR


@pytest.fixture(scope='session')
def real_chips(planet_dir) -> list[pathlib.Path]:
  return sorted((planet_dir / 'train-jpg').glob('*.jpg'))


@pytest.fixture(scope='session')
def small_sample(tmp_path_factory) -> pathlib.Path:
  """60 generated chips with labels, made once per test session."""
  from beam_jobs.make_sample import make_sample
  out = tmp_path_factory.mktemp('small_sample')
  make_sample(str(out), count=60, seed=7)
  return out


def make_export_base(tmp_path_factory, image_size: int) -> pathlib.Path:
  """EXPORT/ with PlanetModel/1: a real SavedModel of an untrained model at `image_size`."""
  from model.export import export_model
  from model.network import build_model
  base = tmp_path_factory.mktemp('export')
  export_model(build_model(image_size), str(base))
  return base


@pytest.fixture(scope='session')
def export_base(tmp_path_factory):
  """A real (untrained) export: predictions are what they are; the job must pass them on exactly.

  Shared by the whole session, so no test may add versions to it (serving tests that do make
  their own with `make_export_base`).
  """
  return make_export_base(tmp_path_factory, PREDICT_IMAGE_SIZE)


@pytest.fixture(scope='session')
def mixed_folder(tmp_path_factory, planet_dir):
  """Good sample chips, the 6 real CMYK chips, one input of every refusal, a duplicate name."""
  from beam_jobs import make_sample
  from tests import hostile_inputs
  root = tmp_path_factory.mktemp('mixed')
  sample = root / 'sample'
  make_sample.make_sample(str(sample), count=24, seed=11, prefix='chip')
  images = root / 'images'
  shutil.copytree(sample / 'train-jpg', images)
  (images / 'real').mkdir()
  for chip in (planet_dir / 'train-jpg').glob('*.jpg'):
    shutil.copy(chip, images / 'real' / chip.name)
  (images / 'empty.jpg').write_bytes(b'')
  (images / 'notes.jpg').write_bytes(b'these are not pixels')
  good = (images / 'chip_1.jpg').read_bytes()
  (images / 'cut.jpg').write_bytes(good[:len(good) // 2])
  (images / 'bomb.png').write_bytes(hostile_inputs.png_declaring(50_000, 50_000))
  (images / 'dup').mkdir()
  shutil.copy(images / 'chip_2.jpg', images / 'dup' / 'chip_2.JPG')
  (images / 'readme.txt').write_text('not matched: not an image extension')
  labels_csv = root / 'labels.csv'
  real_rows = [line for line in (planet_dir / 'train_v2.csv').read_text().splitlines()[1:]
               if line.split(',')[0] in {p.stem for p in (images / 'real').iterdir()}]
  labels_csv.write_text((sample / 'train_v2.csv').read_text() + '\n'.join(real_rows) + '\n')
  return images, labels_csv


@pytest.fixture(scope='session')
def predict_job(tmp_path_factory, export_base, mixed_folder):
  """The in-process prediction job over `mixed_folder`: (output folder, summary)."""
  from beam_jobs import predict
  images, labels_csv = mixed_folder
  out = tmp_path_factory.mktemp('predict_out')
  summary = predict.run(['--input', str(images), '--output_dir', str(out),
                         '--model_dir', str(export_base / 'PlanetModel'),
                         '--labels_csv', str(labels_csv), '--max_bad_fraction', '0.3',
                         '--overwrite'])
  return out, summary
