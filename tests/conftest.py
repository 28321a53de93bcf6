"""Shared fixtures: sample data, and Planet data in the layout of ../shared/planet: generated
always, the real sample too where present (PLANET_REAL_DATA_DIR moves or hides it)."""
import contextlib
import glob
import json
import os
import pathlib
import shutil
import threading
import time
from typing import Callable

import numpy as np
import pytest

from model import schema

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

REPO = pathlib.Path(__file__).resolve().parent.parent
# The real sample; pointing PLANET_REAL_DATA_DIR at a missing folder runs the suite as a clone
# without ../shared would.
PLANET_DIR = pathlib.Path(os.environ.get('PLANET_REAL_DATA_DIR', REPO.parent / 'shared' / 'planet'))
REAL_DATA_PRESENT = (PLANET_DIR / 'train-jpg').is_dir()
# What `planet_dir` gives, a test run each: generated data always, the real sample where present.
PLANET_SOURCES = ('generated', 'real') if REAL_DATA_PRESENT else ('generated',)
# The real sample's chips; the stand-in uses the same names, so that tests name them alike.
PLANET_CHIP_NAMES = ('train_0', 'train_1', 'train_10', 'train_100', 'train_1000', 'train_10000')
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


def is_real(planet_dir: pathlib.Path) -> bool:
  """Whether a `planet_dir` is the real sample (for assertions that hold only of real data)."""
  return planet_dir == PLANET_DIR


def _tutorial_vector(tags, labels) -> str:
  return '"[' + ', '.join('1' if label in tags else '0' for label in labels) + ']"'


def write_planet_stand_in(root: pathlib.Path) -> pathlib.Path:
  """Generated data in the real sample's layout: `train-jpg/` with six 4-component (CMYK) JPEGs
  without a colour marker, as the real chips are (TensorFlow decodes them black), under the real
  chips' names; their labels in `train_v2.csv` and in the tutorial's `KagglePlanetMCML.csv`, with
  the real `train_24448` row (no weather tag, no chip)."""
  from beam_jobs import make_sample
  (root / 'train-jpg').mkdir(parents=True)
  rows = []
  for index, name in enumerate(PLANET_CHIP_NAMES):
    rng = np.random.default_rng([17, index])
    tags = make_sample.sample_tags(rng)
    (root / 'train-jpg' / f'{name}.jpg').write_bytes(
        make_sample.encode_chip(make_sample.draw_chip(tags, rng), as_cmyk=True))
    rows.append((name, tags))
  rows.append(('train_24448', ['water']))
  (root / 'train_v2.csv').write_text(
      'image_name,tags\n' + ''.join(f'{name},{" ".join(tags)}\n' for name, tags in rows))
  (root / 'KagglePlanetMCML.csv').write_text(
      'image_name,weather_labels,ground_labels\n' + ''.join(
          f'{name},{_tutorial_vector(tags, schema.WEATHER_LABELS)},'
          f'{_tutorial_vector(tags, schema.GROUND_LABELS)}\n' for name, tags in rows))
  return root


@pytest.fixture(scope='session')
def planet_stand_in(tmp_path_factory) -> pathlib.Path:
  """The generated stand-in for ../shared/planet (see `write_planet_stand_in`)."""
  return write_planet_stand_in(tmp_path_factory.mktemp('planet_stand_in'))


@pytest.fixture(scope='session', params=PLANET_SOURCES)
def planet_dir(request, planet_stand_in) -> pathlib.Path:
  """Planet data in the layout of ../shared/planet: each test runs on the generated stand-in, and
  again on the real sample where it is present (`is_real` tells which)."""
  return PLANET_DIR if request.param == 'real' else planet_stand_in


@pytest.fixture(scope='session')
def planet_chips(planet_dir) -> list[pathlib.Path]:
  """The six markerless CMYK chips of `planet_dir`."""
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


@pytest.fixture(scope='module')
def server(export_base):
  """The local TF Serving-compatible server on `export_base`, on a free loopback port (modules
  that test serving itself define their own `server`)."""
  from model.serving.local_server import LocalServingServer
  serving = LocalServingServer(str(export_base / 'PlanetModel'))
  serving.start()
  yield serving
  serving.stop()


@pytest.fixture(scope='session')
def mixed_folder(tmp_path_factory, planet_stand_in):
  """Good sample chips, 6 markerless CMYK chips like the real ones, one input of every refusal,
  a duplicate name. Generated only: the real chips have tests of their own (`planet_dir`)."""
  from beam_jobs import make_sample
  from tests import hostile_inputs
  root = tmp_path_factory.mktemp('mixed')
  sample = root / 'sample'
  make_sample.make_sample(str(sample), count=24, seed=11, prefix='chip')
  images = root / 'images'
  shutil.copytree(sample / 'train-jpg', images)
  (images / 'real').mkdir()
  for chip in (planet_stand_in / 'train-jpg').glob('*.jpg'):
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
  real_rows = [line for line in (planet_stand_in / 'train_v2.csv').read_text().splitlines()[1:]
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


@contextlib.contextmanager
def restarted_mid_job(server, calls: Callable[[], int], after: int, down_secs: float = 1.5):
  """While the `with` body runs a job: stops `server` once `calls()` reaches `after`, and starts
  it again `down_secs` later, on a thread. Yields what happened: `calls_before`, `restarted_at`,
  or the `error` of the start; none of them when the job ended first."""
  record = {}
  job_done = threading.Event()

  def restart():
    while calls() < after:
      if job_done.wait(0.02):
        return
    record['calls_before'] = calls()
    server.stop()
    time.sleep(down_secs)
    try:
      server.start()
    except OSError as error:   # the test's assertion names it
      record['error'] = error
      return
    record['restarted_at'] = time.monotonic()
  restarter = threading.Thread(target=restart, name='restarter')
  restarter.start()
  try:
    yield record
  finally:
    job_done.set()
    restarter.join()
