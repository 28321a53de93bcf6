"""The one image decoder: file bytes in, uint8 [size, size, 3] RGB out, or a typed refusal.

Every stage that reads an image calls `decode_image`, so the pixels a model trains on and the
pixels it predicts on come from the same code. Pillow, not TensorFlow: real Planet chips are
4-component JPEGs without a colour marker, which `tf.io.decode_jpeg` returns as black.

What the decoder does besides decoding:
  * 16-bit grey (Pillow modes `I;16*`, and `I` holding 0..65535) is scaled to 8 bits, 65535 -> 255;
    float grey (mode `F`) in [0, 1] is scaled to [0, 255]. Anything else in those modes is refused
    as UNSUPPORTED_PIXELS rather than clipped to white.
  * An EXIF orientation tag is applied, so the pixels are the picture as a viewer shows it.
  * The image is resized to a square, so a non-square image is squashed, not cropped.
  * The header's pixel count is checked against `max_pixels` before any pixel is decoded; that is
    the only pixel limit (Pillow's own decompression-bomb limit is switched off below).
"""
import io

import numpy as np
from PIL import Image, ImageFile

from model.errors import InputRefused, Reason

__all__ = ['decode_image', 'DEFAULT_MAX_PIXELS', 'RESIZE_FILTER']

# A truncated file must be refused, never padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Our own check against `max_pixels` (before any pixel is decoded) replaces Pillow's
# decompression-bomb limit, which would otherwise refuse anything above 2 x 89 million pixels
# whatever --max_pixels says. Set once here, not per call: the predict job decodes in threads.
Image.MAX_IMAGE_PIXELS = None

# One filter for every resize, in every stage. Chips are downscaled by whole factors (256 -> 128);
# draft() already does the first halvings in the DCT domain, and a box filter is what that equals.
RESIZE_FILTER = Image.Resampling.BOX

# 10,000 x 10,000: far above any satellite chip, far below what would exhaust a worker's memory
# (RGB at this size is 300 MB). Checked against the header before any pixel is decoded.
DEFAULT_MAX_PIXELS = 100_000_000

# Pillow's modes for one channel of 16-bit integers. `I` is 32-bit, but Pillow reads 16-bit PGM
# and (before version 10) 16-bit PNG into it, so its values are taken as 16-bit too.
_SIXTEEN_BIT_MODES = frozenset({'I', 'I;16', 'I;16L', 'I;16B', 'I;16N'})
_SIXTEEN_BIT_MAX = 65535

_EXIF_ORIENTATION = 0x0112
# How to turn the stored pixels into the displayed picture, for each EXIF orientation value
# (the same table as PIL.ImageOps.exif_transpose). 1, the usual value, needs nothing.
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _to_eight_bit(image: Image.Image) -> Image.Image:
  """Scales a loaded 16-bit or float grey image to mode `L`, as `convert` would if it did not clip.

  Raises:
    InputRefused: UNSUPPORTED_PIXELS for values outside 0..65535 (integers) or 0..1 (floats).
  """
  values = np.asarray(image)
  if image.mode == 'F':
    if not np.isfinite(values).all():
      raise InputRefused(
          Reason.UNSUPPORTED_PIXELS,
          'the image has floating-point pixels that are NaN or infinite; export it as an 8- or '
          '16-bit image')
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
      raise InputRefused(
          Reason.UNSUPPORTED_PIXELS,
          f'the image has floating-point pixels from {low:.6g} to {high:.6g}; only 0..1 is '
          'understood, so export it as an 8- or 16-bit image')
    return Image.fromarray(np.rint(values * 255).astype(np.uint8))
  low, high = int(values.min()), int(values.max())
  if low < 0 or high > _SIXTEEN_BIT_MAX:
    raise InputRefused(
        Reason.UNSUPPORTED_PIXELS,
        f'the image has 32-bit integer pixels from {low} to {high}, outside the 16-bit range '
        f'0..{_SIXTEEN_BIT_MAX}; export it as an 8- or 16-bit image')
  # round(v / 257) in integers: 65535 -> 255, 32896 -> 128; uint32 so that v + 128 cannot wrap.
  wide = values.astype(np.uint32)
  wide += 128
  wide //= 257
  return Image.fromarray(wide.astype(np.uint8))


def _orientation_transpose(image: Image.Image) -> Image.Transpose | None:
  """The transpose that the image's EXIF orientation tag asks for, or None if there is none."""
  try:
    orientation = image.getexif().get(_EXIF_ORIENTATION)
  except Exception:  # pylint: disable=broad-except
    # The pixels decoded; only the metadata is damaged. Viewers then show the stored pixels, and
    # refusing a good image over its metadata would lose it.
    return None
  if not isinstance(orientation, int):
    return None
  # Values outside 2..8 (0 is common from some cameras) mean "as stored", as they do to viewers.
  return _TRANSPOSE_FOR_ORIENTATION.get(orientation)


def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Decodes an image file's bytes to a square RGB array.

  Usage: `pixels = decode_image(open(path, 'rb').read(), 128)`

  16-bit grey images are scaled to 8 bits (65535 -> 255, rounded); float grey images must hold
  values in [0, 1], which are scaled to [0, 255]. An EXIF orientation tag is applied before the
  resize, so a rotated photo comes out upright. The picture is resized to `size` x `size`
  whatever its aspect ratio: a non-square image is squashed, not cropped or padded.

  Args:
    data: the whole file, any format Pillow reads (the extension is never trusted).
    size: the output side length in pixels.
    max_pixels: refuse images whose header declares more pixels than this. This is the only
      pixel limit: Pillow's own is switched off, so it may be raised as far as memory allows.

  Returns:
    A C-contiguous `uint8` array of shape `[size, size, 3]`.

  Raises:
    InputRefused: with reason EMPTY_FILE, NOT_AN_IMAGE, TOO_MANY_PIXELS, TRUNCATED_IMAGE,
      CORRUPT_IMAGE or UNSUPPORTED_PIXELS (float pixels outside [0, 1], integers outside 16 bits).
  """
  if not data:
    raise InputRefused(Reason.EMPTY_FILE, 'the file is empty (0 bytes); re-copy it from its source')
  try:
    image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    # Only if other code in this process has set Pillow's limit again.
    raise InputRefused(
        Reason.TOO_MANY_PIXELS,
        f'refused before decoding by Pillow\'s own limit ({e}); set '
        'PIL.Image.MAX_IMAGE_PIXELS = None so that --max_pixels is the only limit') from None
  except Exception as e:  # Pillow raises UnidentifiedImageError, but also struct/EOF errors.
    # Not str(e): Pillow's message names a BytesIO address, and dead letters must be reproducible.
    raise InputRefused(
        Reason.NOT_AN_IMAGE,
        f'not an image Pillow can read ({type(e).__name__}); expected a JPEG or PNG file') from None
  width, height = image.size
  if width * height > max_pixels:
    raise InputRefused(
        Reason.TOO_MANY_PIXELS,
        f'the header declares {width}x{height} = {width * height} pixels, above the limit of '
        f'{max_pixels}; refused before decoding (raise --max_pixels only for trusted input)')
  if width < 1 or height < 1:
    raise InputRefused(Reason.CORRUPT_IMAGE, f'the header declares {width}x{height} pixels')
  try:
    # JPEG only: decode at the smallest power-of-two scale that is still >= size. The request is
    # square, so a later 90-degree rotation cannot make that scale too small.
    image.draft('RGB', (size, size))
    image.load()
    # Checked by mode first, so that ordinary 8-bit images (and the JPEG fast path) pay nothing.
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == 'F':
      image = _to_eight_bit(image)
    # After load(): a PNG's EXIF may follow its pixel data, and getexif() would load it otherwise.
    transpose = _orientation_transpose(image)
    if transpose is not None:
      image = image.transpose(transpose)
    if image.mode != 'RGB':   # convert('RGB') of an RGB image is only a copy
      image = image.convert('RGB')
    if image.size != (size, size):
      image = image.resize((size, size), RESIZE_FILTER)
    pixels = np.asarray(image, dtype=np.uint8)
  except InputRefused:  # A ValueError, but already says what is wrong.
    raise
  except OSError as e:
    if 'truncated' in str(e) or isinstance(e, EOFError):
      raise InputRefused(
          Reason.TRUNCATED_IMAGE,
          f'the file ends before the image does ({e}); re-copy it from its source') from None
    raise InputRefused(Reason.CORRUPT_IMAGE, f'the image data is corrupt ({e})') from None
  except (ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError) as e:
    raise InputRefused(
        Reason.CORRUPT_IMAGE, f'the image data is corrupt ({type(e).__name__}: {e})') from None
  if pixels.shape != (size, size, 3):
    raise InputRefused(Reason.CORRUPT_IMAGE, f'decoded to shape {pixels.shape}, not RGB')
  return np.ascontiguousarray(pixels)
