"""The report's sample of predicted images: which, how many, and each as a small inline JPEG.

The sample is the MAX_THUMBNAILS items whose `rows.thumbnail_key` (a hash of the image name) is
smallest: content-independent, the same whatever the order or the workers, and drawn in pieces
(a `Sample` per bundle, then the sample of those) without any step seeing every item.

Usage:
  sample = Sample(); sample.add(((name, path, sha256), row)); candidates = sample.items()
  sampled = draw_sample(candidates_of_each_bundle)
  page = report_html.render_report(summary, make_thumbnails(sampled, size, max_pixels, max_bytes))
"""
import base64
import heapq
import io

import numpy as np
from PIL import Image

from beam_jobs.common.image_decoder import decode_image
from beam_jobs.common.image_files import read_image_file
from beam_jobs.predict.rows import thumbnail_key
from model.errors import InputRefused

__all__ = ['MAX_THUMBNAILS', 'THUMBNAIL_QUALITY', 'Sample', 'draw_sample', 'make_thumbnail',
           'make_thumbnails']

# A few dozen chips give a feel for the predictions; hundreds would make a multi-megabyte page.
# The job samples this many and the report shows at most this many.
MAX_THUMBNAILS = 36
THUMBNAIL_QUALITY = 85


class Sample:
  """The `size` items with the smallest `thumbnail_key` among those added.

  Items are ((name, ...), value) with unique names, so no two keys tie.
  """

  def __init__(self, size: int = MAX_THUMBNAILS):
    self._size = size
    self._keyed = []

  def add(self, item) -> None:
    self._keyed.append((thumbnail_key(item), item))
    if len(self._keyed) >= 4 * self._size:   # cut back now and then, not on every item
      self._keyed = heapq.nsmallest(self._size, self._keyed, key=lambda keyed: keyed[0])

  def items(self) -> list:
    """The sample, smallest key first."""
    return [item for _, item in heapq.nsmallest(self._size, self._keyed,
                                                 key=lambda keyed: keyed[0])]


def draw_sample(candidate_lists) -> list:
  """The sample of all items in `candidate_lists` (each a `Sample`'s items)."""
  sample = Sample()
  for items in candidate_lists:
    for item in items:
      sample.add(item)
  return sample.items()


def make_thumbnail(pixels: np.ndarray, side: int = 96) -> str:
  """Shrinks an RGB image to a small JPEG and returns it as a `data:` URI for an <img src>.

  Usage: `src = make_thumbnail(decode_image(data, 128))`

  Args:
    pixels: `uint8` array of shape `[height, width, 3]`, as `image_decoder.decode_image` returns.
    side: the longer side of the thumbnail in pixels; the aspect ratio is kept.

  Returns:
    `'data:image/jpeg;base64,...'`.

  Raises:
    ValueError: the array is not `uint8` RGB, or `side` is not positive.
  """
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
    raise ValueError(f'expected uint8 [height, width, 3] pixels, got {pixels.dtype} {pixels.shape}')
  if side < 1:
    raise ValueError(f'side must be at least 1, got {side}')
  image = Image.fromarray(pixels, 'RGB')
  image.thumbnail((side, side), Image.Resampling.LANCZOS)
  buffer = io.BytesIO()
  image.save(buffer, 'JPEG', quality=THUMBNAIL_QUALITY)
  return 'data:image/jpeg;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


def make_thumbnails(sampled, image_size: int, max_pixels: int, max_file_bytes: int) -> list[dict]:
  """The sample's ((name, path, sha256), row) items -> the report's thumbnails, by name, with
  their rows' tags. Each image is read and decoded again here (no pixels travel with the rows),
  and left out if it cannot be any more."""
  thumbs = []
  for (name, path, _), row in sorted(sampled, key=lambda item: item[0]):
    try:
      pixels = decode_image(read_image_file(path, max_file_bytes), image_size, max_pixels)
    except InputRefused:
      continue
    thumbs.append({'image_name': name, 'tags': row['tags'], 'src': make_thumbnail(pixels)})
  return thumbs
