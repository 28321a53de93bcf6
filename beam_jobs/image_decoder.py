"""The one image decoder: file bytes in, uint8 [size, size, 3] RGB out, or a typed refusal.

Every stage that reads an image calls `decode_image`, so the pixels a model trains on and the
pixels it predicts on come from the same code. Pillow, not TensorFlow: real Planet chips are
4-component JPEGs without a colour marker, which `tf.io.decode_jpeg` returns as black.
"""
import io
import warnings

import numpy as np
from PIL import Image, ImageFile

from model.errors import InputRefused, Reason

# A truncated file must be refused, never padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# One filter for every resize, in every stage. Chips are downscaled by whole factors (256 -> 128);
# draft() already does the first halvings in the DCT domain, and a box filter is what that equals.
RESIZE_FILTER = Image.Resampling.BOX

# 10,000 x 10,000: far above any satellite chip, far below what would exhaust a worker's memory
# (RGB at this size is 300 MB). Checked against the header before any pixel is decoded.
DEFAULT_MAX_PIXELS = 100_000_000


def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Decodes an image file's bytes to a square RGB array.

  Usage: `pixels = decode_image(open(path, 'rb').read(), 128)`

  Args:
    data: the whole file, any format Pillow reads (the extension is never trusted).
    size: the output side length in pixels.
    max_pixels: refuse images whose header declares more pixels than this.

  Returns:
    A C-contiguous `uint8` array of shape `[size, size, 3]`.

  Raises:
    InputRefused: with reason EMPTY_FILE, NOT_AN_IMAGE, TOO_MANY_PIXELS, TRUNCATED_IMAGE or
      CORRUPT_IMAGE.
  """
  if not data:
    raise InputRefused(Reason.EMPTY_FILE, 'the file is empty (0 bytes); re-copy it from its source')
  try:
    with warnings.catch_warnings():
      # Our own limit below replaces Pillow's DecompressionBombWarning.
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise InputRefused(Reason.TOO_MANY_PIXELS, f'refused before decoding: {e}') from None
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
        f'{max_pixels}; refused before decoding (raise the limit only for trusted input)')
  if width < 1 or height < 1:
    raise InputRefused(Reason.CORRUPT_IMAGE, f'the header declares {width}x{height} pixels')
  try:
    # JPEG only: decode at the smallest power-of-two scale that is still >= size.
    image.draft('RGB', (size, size))
    image = image.convert('RGB')
    if image.size != (size, size):
      image = image.resize((size, size), RESIZE_FILTER)
    pixels = np.asarray(image, dtype=np.uint8)
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
