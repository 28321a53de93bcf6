"""Shared fixtures: real Planet chips from ../shared/planet (skipped where absent), sample data."""
import os
import pathlib

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

REPO = pathlib.Path(__file__).resolve().parent.parent
PLANET_DIR = REPO.parent / 'shared' / 'planet'


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
