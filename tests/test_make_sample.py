"""Sample data: deterministic for a seed, real label frequencies, CMYK chips like the real ones."""
import collections
import hashlib

import numpy as np
import pytest

from beam_jobs.common import labels
from beam_jobs import make_sample
from beam_jobs.common.image_decoder import decode_image
from model import schema
from tests.conftest import PLANET_DIR, REAL_DATA_PRESENT


def _tree_digest(root):
  return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


def test_same_seed_gives_byte_identical_output(tmp_path):
  make_sample.main(['--output_dir', str(tmp_path / 'a'), '--count', '25', '--seed', '3'])
  make_sample.main(['--output_dir', str(tmp_path / 'b'), '--count', '25', '--seed', '3'])
  make_sample.main(['--output_dir', str(tmp_path / 'c'), '--count', '25', '--seed', '4'])
  a, b, c = (_tree_digest(tmp_path / d) for d in 'abc')
  assert len(a) == 26 and a == b
  assert a['train_v2.csv'] != c['train_v2.csv']


def test_output_parses_and_decodes(small_sample):
  rows, refused = labels.parse_label_file(str(small_sample / 'train_v2.csv'))
  assert refused == [] and len(rows) == 60
  for name, row in rows.items():
    assert sum(row.weather) == 1, name  # exactly one weather tag
    data = (small_sample / 'train-jpg' / f'{name}.jpg').read_bytes()
    assert decode_image(data, 128).mean() > 20


def test_some_chips_are_markerless_cmyk_like_the_real_ones(small_sample):
  from PIL import Image
  modes = collections.Counter(Image.open(p).mode for p in (small_sample / 'train-jpg').iterdir())
  assert 1 <= modes['CMYK'] <= 15 and modes['RGB'] + modes['CMYK'] == 60
  cmyk = next(p for p in (small_sample / 'train-jpg').iterdir() if Image.open(p).mode == 'CMYK')
  data = cmyk.read_bytes()
  assert b'Adobe' not in data[:2000] and b'JFIF' not in data[:2000]


@pytest.mark.slow
def test_label_frequencies_follow_the_real_ones(tmp_path):
  make_sample.main(['--output_dir', str(tmp_path), '--count', '2000', '--seed', '0'])
  sample, _ = labels.parse_label_file(str(tmp_path / 'train_v2.csv'))

  def frequencies(rows):
    matrix = np.array([r.weather + r.ground for r in rows.values()])
    return matrix.mean(axis=0)
  # The real file's figures (shared/planet/README.md): clear 28431 of 40479 rows, ...
  published = np.array([make_sample.REAL_TAG_COUNTS[label] for label in schema.ALL_LABELS])
  difference = np.abs(frequencies(sample) - published / make_sample.REAL_ROWS)
  assert difference.max() < 0.03, difference
  if REAL_DATA_PRESENT:   # and against the real file itself
    real, _ = labels.parse_label_file(str(PLANET_DIR / 'train_v2.csv'))
    assert len(real) == make_sample.REAL_ROWS
    difference = np.abs(frequencies(sample) - frequencies(real))
    assert difference.max() < 0.03, difference
