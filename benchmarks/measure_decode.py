"""JPEG decode rate of the one decoder, with `draft()` and without it.

Usage: python -m benchmarks --only decode [--quick] [--work /tmp/planet_bench]
       (the same figures as the decode part of `python -m benchmarks`)

Both decode the same bytes, already in memory, to 128 px RGB with the same resize filter:
  with_draft:    beam_jobs.common.image_decoder.decode_image (JPEG decoded at 1/2 scale in the DCT).
  without_draft: `decode_full_size` below: Image.open + convert('RGB') + resize, full-size decode.
On the generated chips (10% CMYK) and, where ../shared/planet holds them, on the real chips
(all 4-component JPEGs), cycled to the same count.
"""
import glob
import io
import os
import time

import numpy as np
from PIL import Image

from benchmarks import workspace
from benchmarks.plan import Plan, loop_figures, ratio

REAL_CHIPS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'shared', 'planet', 'train-jpg')


def decode_full_size(data: bytes, size: int) -> np.ndarray:
  """The decoder without draft(): every pixel of the JPEG decoded, then resized."""
  from beam_jobs.common.image_decoder import RESIZE_FILTER  # pylint: disable=import-outside-toplevel
  image = Image.open(io.BytesIO(data)).convert('RGB').resize((size, size), RESIZE_FILTER)
  return np.asarray(image, dtype=np.uint8)


def _read(paths: list[str]) -> list[bytes]:
  blobs = []
  for path in paths:
    with open(path, 'rb') as f:
      blobs.append(f.read())
  return blobs


def measure(plan: Plan, work: str, log=print) -> dict:
  from beam_jobs.common.image_decoder import decode_image  # pylint: disable=import-outside-toplevel
  chips = workspace.chips(work, plan.big)
  sets = {'sample': _read(workspace.image_paths(chips)[:plan.loop_images])}
  real = sorted(glob.glob(os.path.join(REAL_CHIPS, '*.jpg')))
  if real:
    blobs = _read(real)
    sets['real'] = [blobs[i % len(blobs)] for i in range(min(plan.loop_images, 600))]
  decoders = {'with_draft': decode_image, 'without_draft': decode_full_size}
  seconds = {(s, d): [] for s in sets for d in decoders}
  for repeat in range(plan.repeats):
    for name, blobs in sets.items():
      for decoder_name, decoder in decoders.items():
        started = time.perf_counter()
        for blob in blobs:
          decoder(blob, workspace.IMAGE_SIZE)
        seconds[(name, decoder_name)].append(time.perf_counter() - started)
    log(f'  decode run {repeat + 1}: ' + ', '.join(
        f'{s} {d} {len(sets[s]) / v[-1]:.0f}/s' for (s, d), v in seconds.items()))
  figures = {}
  for name, blobs in sets.items():
    figures[name] = {d: loop_figures(len(blobs), seconds[(name, d)]) for d in decoders}
    figures[name]['draft_speedup'] = ratio(figures[name]['with_draft']['images_per_s'],
                                           figures[name]['without_draft']['images_per_s'])
  return figures
