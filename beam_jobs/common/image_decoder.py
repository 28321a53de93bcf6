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
  * Bands it cannot map to RGB faithfully are refused as UNSUPPORTED_BANDS, never guessed at: a
    TIFF with 16-bit samples and more than one band, or with a band beyond its colours that is not
    declared plain alpha (Planet's analytic B,G,R,NIR chips are both; Pillow would read B,G,R as
    R,G,B and NIR as alpha), and any image Pillow reads in a mode other than grey, palette, RGB,
    CMYK or those with alpha.
  * A JPEG whose data ends before the picture its header declares is refused as TRUNCATED_IMAGE.
    libjpeg pads such a scan with flat blocks and only warns, and Pillow drops its warnings; see
    `_jpeg_data_ends_early`.
"""
import io
import re
import struct

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

# The modes whose pixels `convert('RGB')` (after `_to_eight_bit` for the 16-bit and float ones)
# maps to the colours a viewer shows. Others (LAB, HSV, premultiplied `La`/`RGBa`, ...) are refused.
_RGB_MAPPABLE_MODES = frozenset(
    {'1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA', 'CMYK', 'YCbCr', 'F'}) | _SIXTEEN_BIT_MODES

# TIFF tags read to decide whether the bands are colours the model takes.
_TIFF_BITS_PER_SAMPLE = 258
_TIFF_PHOTOMETRIC = 262
_TIFF_SAMPLES_PER_PIXEL = 277
_TIFF_EXTRA_SAMPLES = 338
_TIFF_UNASSOCIATED_ALPHA = 2
# Colour samples per pixel for each TIFF photometric interpretation: white/black-is-zero grey,
# RGB, palette, separated (CMYK), YCbCr, CIELab. Samples beyond these are "extra samples".
_TIFF_COLOUR_SAMPLES = {0: 1, 1: 1, 2: 3, 3: 1, 5: 4, 6: 3, 8: 3}
_TIFF_SIGNATURES = (b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+')

_TIFF_REMEDY = ('this model takes RGB images: predict the matching JPEG chip (train-jpg), or '
                'convert the TIFF to an 8-bit RGB image')

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


def _check_tiff_bands(tags) -> None:
  """Refuses a TIFF whose bands are not grey, palette, RGB or CMYK (each with at most a true alpha).

  Args:
    tags: the first IFD's tags, tag number -> value (Pillow's `tag_v2`).

  Raises:
    InputRefused: UNSUPPORTED_BANDS.
  """
  samples = tags.get(_TIFF_SAMPLES_PER_PIXEL, 1)
  bits = tags.get(_TIFF_BITS_PER_SAMPLE, (1,))
  bits = tuple(bits) if isinstance(bits, (tuple, list)) else (bits,)
  widest = max(bits, default=1)
  # Pillow keeps only the high byte of each 16-bit colour sample (no rounding), and such files are
  # in practice analytic products (radiance or reflectance that does not span 0..65535), whose
  # linear 8-bit scaling is a dark picture unlike the chips the model learnt from.
  if samples > 1 and widest > 8:
    raise InputRefused(
        Reason.UNSUPPORTED_BANDS,
        f'a {samples}-band {widest}-bit TIFF ({samples} samples per pixel, {widest} bits each: '
        f'Planet\'s analytic B,G,R,NIR chips are like this); {_TIFF_REMEDY}')
  photometric = tags.get(_TIFF_PHOTOMETRIC)
  colours = _TIFF_COLOUR_SAMPLES.get(photometric)
  if colours is None or samples <= colours:
    return  # Other photometrics are refused by their Pillow mode, or by Pillow itself.
  extra = tags.get(_TIFF_EXTRA_SAMPLES, ())
  extra = tuple(extra) if isinstance(extra, (tuple, list)) else (extra,)
  # Planet's analytic chips declare their NIR band as premultiplied alpha (ExtraSamples = 1), and
  # an unspecified band (0) or none declared can be anything: only unassociated alpha is safe.
  if samples == colours + 1 and extra == (_TIFF_UNASSOCIATED_ALPHA,):
    return
  declared = ', '.join(map(str, extra)) if extra else 'absent'
  raise InputRefused(
      Reason.UNSUPPORTED_BANDS,
      f'a {samples}-band TIFF ({samples} samples per pixel, {samples - colours} beyond its '
      f'{colours} colour band(s), not declared plain alpha: ExtraSamples = {declared}; Planet\'s '
      f'analytic B,G,R,NIR chips are like this); {_TIFF_REMEDY}')


def _check_unopenable_tiff(data: bytes) -> None:
  """Refuses, as UNSUPPORTED_BANDS, a TIFF that Pillow cannot open because of its bands.

  Pillow knows a fixed list of band layouts and calls anything else (5 bands, 16-bit grey with
  alpha) not an image; the user is better told what the file is. Returns for anything else.
  """
  if not data.startswith(_TIFF_SIGNATURES):
    return
  from PIL import TiffImagePlugin  # pylint: disable=import-outside-toplevel
  try:
    big = data[2:4] in (b'+\x00', b'\x00+')  # BigTIFF's header is 16 bytes, classic TIFF's 8.
    directory = TiffImagePlugin.ImageFileDirectory_v2(data[:16 if big else 8])
    stream = io.BytesIO(data)
    stream.seek(directory.next)
    directory.load(stream)
    tags = dict(directory)
  except Exception:  # pylint: disable=broad-except
    return  # Not even its first directory reads: NOT_AN_IMAGE says enough.
  _check_tiff_bands(tags)


# Bytes decoded as entropy-coded data in place of the data a short scan lacks. Any fixed bytes
# without 0xFF (a marker) serve; varied ones, so that they decode to anything but the all-zero
# coefficients libjpeg pads with.
_JPEG_FILLER = bytes(np.random.default_rng(20).integers(0, 255, 256, dtype=np.uint8))
# Start-of-frame markers of the DCT processes (baseline, extended, progressive; Huffman or
# arithmetic), whose scans must bring every coefficient of every component down to bit 0.
_JPEG_DCT_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length.
# A scan's entropy-coded data runs to the first 0xFF that is not a stuffed 0x00 or a restart
# marker (a regular expression, so that the bytes are scanned in C).
_JPEG_MARKER_AFTER_SCAN = re.compile(rb'\xff(?![\x00\xd0-\xd7])', re.DOTALL)


def _jpeg_scans(data: bytes) -> tuple[list[int], bool] | None:
  """Walks a JPEG's markers.

  Returns:
    (where each scan's entropy-coded data ends, whether the scans decode every coefficient of
    every component to its last bit), or None if the markers cannot be walked (the decoder then
    relies on Pillow alone).
  """
  if not data.startswith(b'\xff\xd8'):
    return None
  ends, pos, size = [], 2, len(data)
  dct = False
  # The lowest bit decoded so far of each coefficient of each component (None: never).
  lowest_bit = {}
  while pos < size:
    if data[pos] != 0xFF:
      return None
    while pos < size and data[pos] == 0xFF:  # fill bytes
      pos += 1
    if pos + 1 > size:
      return None
    marker = data[pos]
    pos += 1
    if marker == _JPEG_EOI:
      break
    if marker in _JPEG_STANDALONE:
      continue
    if pos + 2 > size:
      return None
    (length,) = struct.unpack_from('>H', data, pos)
    segment = data[pos + 2:pos + length]
    pos += length
    if marker in _JPEG_DCT_FRAMES and len(segment) >= 6:
      dct = True
      lowest_bit = {component: [None] * 64 for component in segment[6:6 + 3 * segment[5]:3]}
    if marker != _JPEG_SOS:
      continue
    if dct and segment and len(segment) >= 4 + 2 * segment[0]:
      count = segment[0]
      start, end, bits = segment[1 + 2 * count:4 + 2 * count]
      high, low = bits >> 4, bits & 0x0F
      for component in segment[1:1 + 2 * count:2]:
        coefficients = lowest_bit.get(component)
        if coefficients is None:
          return None
        end = min(end, 63)
        # A first scan sets a coefficient's bits down to `low`; a refinement adds one bit.
        coefficients[start:end + 1] = (
            [low] * (end + 1 - start) if high == 0 else
            [low if bit == high else bit for bit in coefficients[start:end + 1]])
    scan_end = _JPEG_MARKER_AFTER_SCAN.search(data, pos)
    pos = scan_end.start() if scan_end else size
    ends.append(pos)
  complete = all(coefficients.count(0) == 64 for coefficients in lowest_bit.values())
  return ends, complete


def _decode_jpeg(data: bytes, size: int) -> Image.Image:
  image = Image.open(io.BytesIO(data))
  image.draft('RGB', (size, size))
  image.load()
  return image


def _corner_is_flat(image: Image.Image) -> bool:
  """Whether the last two pixels are one colour, as a padded last block always makes them.

  Padding gives each missing block the DC value of the block before it and no detail, so this
  holds at every draft scale, also at 1/8 where a block is one pixel.
  """
  width, height = image.size
  extrema = image.crop((max(0, width - 2), height - 1, width, height)).getextrema()
  if not isinstance(extrema[0], tuple):
    extrema = (extrema,)
  return all(low == high for low, high in extrema)


def _jpeg_data_ends_early(data: bytes, image: Image.Image, size: int) -> bool:
  """Whether a loaded JPEG's scans lacked data for the picture its header declares.

  When a scan's data ends before its last block (a header declaring more rows than were written,
  or a cut file with an end marker after it), libjpeg warns and pads the rest with zero
  coefficients: flat blocks, which Pillow returns as a normal image. Its warnings are not
  reachable from Python, so the decoder checks two things instead:
    * the scans named in the markers must decode every coefficient (a progressive file that ends
      after some of its scans passes libjpeg silently);
    * the file is decoded again with filler bytes at the end of each scan's data. A complete scan
      never reads past its own data, so its pixels do not change; a short one decodes the filler,
      so they do. A one-scan file (baseline, Planet's) pays for this only when its last block is
      flat, as a padded one always is; a progressive file always does, since its last scan only
      refines blocks that earlier scans drew.
  """
  walked = _jpeg_scans(data)
  if walked is None:
    return False
  ends, complete = walked
  if not complete:
    return True
  if not ends or (len(ends) == 1 and not _corner_is_flat(image)):
    return False
  pieces, start = [], 0
  for end in ends:
    pieces += [data[start:end], _JPEG_FILLER]
    start = end
  pieces.append(data[start:])
  try:
    again = _decode_jpeg(b''.join(pieces), size)
  except Exception:  # pylint: disable=broad-except
    return True  # The first decode read nothing past the scans; filler there changed the result.
  return again.tobytes() != image.tobytes()


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
      CORRUPT_IMAGE, UNSUPPORTED_PIXELS (float pixels outside [0, 1], integers outside 16 bits) or
      UNSUPPORTED_BANDS (bands that are not grey, palette, RGB or CMYK with at most a true alpha,
      such as Planet's 4-band 16-bit analytic TIFFs).
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
    _check_unopenable_tiff(data)
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
  if image.format == 'TIFF':
    _check_tiff_bands(image.tag_v2)
  if image.mode not in _RGB_MAPPABLE_MODES:
    raise InputRefused(
        Reason.UNSUPPORTED_BANDS,
        f'a {image.format} image with bands Pillow reads as {image.mode!r}, which has no faithful '
        'RGB picture; convert it to an 8-bit RGB image')
  try:
    # JPEG only: decode at the smallest power-of-two scale that is still >= size. The request is
    # square, so a later 90-degree rotation cannot make that scale too small.
    image.draft('RGB', (size, size))
    image.load()
    if image.format in ('JPEG', 'MPO') and _jpeg_data_ends_early(data, image, size):
      raise InputRefused(
          Reason.TRUNCATED_IMAGE,
          f'the image data ends before the {width}x{height} picture its header declares; '
          're-copy it from its source')
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
