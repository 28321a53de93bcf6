"""Decoder fuzzing: mutated, truncated and spliced JPEG/PNG bytes give pixels or a typed refusal.

Never another exception, never a hang, never unbounded memory. The number of cases is printed
(`-s`) and recorded in RELIABILITY.md.
"""
import io
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from beam_jobs.common.image_decoder import decode_image
from beam_jobs.make_sample import draw_chip, encode_chip
from model.errors import InputRefused
from tests.conftest import PLANET_DIR

SIZE = 32
# A fuzz case that takes longer than this is a hang for our purposes (a chip decodes in ~2 ms).
CASE_SECONDS = 2.0
CASE_PEAK_BYTES = 64 * 2**20


def _seeds() -> list[bytes]:
  rng = np.random.default_rng(0)
  chip = draw_chip(['clear', 'primary', 'road'], rng)
  png, progressive, rgba_tiff = io.BytesIO(), io.BytesIO(), io.BytesIO()
  chip.resize((64, 64)).save(png, 'PNG')
  chip.resize((64, 64)).save(progressive, 'JPEG', quality=90, progressive=True)
  chip.resize((32, 32)).convert('RGBA').save(rgba_tiff, 'TIFF')  # a multi-band TIFF that decodes
  seeds = [encode_chip(chip, as_cmyk=False), encode_chip(chip, as_cmyk=True), png.getvalue(),
           progressive.getvalue(), rgba_tiff.getvalue()]
  real = sorted((PLANET_DIR / 'train-jpg').glob('*.jpg'))[:2] if PLANET_DIR.is_dir() else []
  return seeds + [p.read_bytes() for p in real]


SEEDS = _seeds()
CASES = {'count': 0, 'decoded': 0, 'refused': 0}


def _check(data: bytes) -> None:
  CASES['count'] += 1
  tracemalloc.start()
  start = time.perf_counter()
  try:
    pixels = decode_image(data, SIZE)
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
    CASES['decoded'] += 1
  except InputRefused as e:
    assert e.message
    CASES['refused'] += 1
  finally:
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
  assert time.perf_counter() - start < CASE_SECONDS
  assert peak < CASE_PEAK_BYTES, f'{peak} bytes for a {len(data)}-byte input'


FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(seed=st.sampled_from(SEEDS), flips=st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=20))
def test_mutated_bytes(seed, flips):
  data = bytearray(seed)
  for where, value in flips:
    data[int(where * len(data))] = value
  _check(bytes(data))


@FUZZ
@given(seed=st.sampled_from(SEEDS), keep=st.floats(0, 1))
def test_truncated_bytes(seed, keep):
  _check(seed[:int(keep * len(seed))])


@FUZZ
@given(a=st.sampled_from(SEEDS), b=st.sampled_from(SEEDS), cut_a=st.floats(0, 1),
       cut_b=st.floats(0, 1))
def test_spliced_bytes(a, b, cut_a, cut_b):
  _check(a[:int(cut_a * len(a))] + b[int(cut_b * len(b)):])


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(data):
  _check(data)


def test_report_case_count():
  # Runs after the fuzz tests in file order; proves they ran and says how many cases.
  print(f'\ndecoder fuzzing: {CASES}')
  if CASES['count'] == 0:
    pytest.skip('run with the fuzz tests')
  assert CASES['count'] >= 1000 and CASES['decoded'] + CASES['refused'] == CASES['count']
