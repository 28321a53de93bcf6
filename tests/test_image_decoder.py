"""The one decoder: correct colours for every image kind, typed refusals for every bad input."""
import io
import struct
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from beam_jobs.common.image_decoder import RESIZE_FILTER, decode_image
from beam_jobs.make_sample import draw_chip, encode_chip
from model.errors import InputRefused, Reason
from tests.conftest import PLANET_DIR
from tests.hostile_inputs import png_declaring


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _gradient(size=200) -> np.ndarray:
  y, x = np.mgrid[0:size, 0:size]
  return np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def _refusal(data: bytes, **kwargs) -> Reason:
  with pytest.raises(InputRefused) as info:
    decode_image(data, 64, **kwargs)
  assert info.value.message  # every refusal tells the user something
  return info.value.reason


def test_planet_chips_match_pillow_and_are_not_black(planet_chips):
  assert len(planet_chips) == 6
  for path in planet_chips:
    data = path.read_bytes()
    pixels = decode_image(data, 128)
    reference = np.asarray(Image.open(path).convert('RGB').resize((128, 128), RESIZE_FILTER))
    assert pixels.shape == (128, 128, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(float) - reference).mean() < 1.0, path.name
    assert pixels.mean() > 20, f'{path.name} decoded (nearly) black'


def test_planet_chips_are_black_in_tensorflow(planet_chips):
  # The reason the project has its own decoder: this must stay true, or the premise changed.
  import tensorflow as tf
  assert tf.io.decode_jpeg(planet_chips[0].read_bytes()).numpy().max() == 0


@pytest.mark.parametrize('mode', ['L', 'P', 'RGBA', 'RGB', 'CMYK'])
def test_every_mode_gives_rgb_of_the_right_colours(mode):
  rgb = Image.fromarray(_gradient())
  image = rgb.convert(mode)
  data = _encode(image, 'PNG' if mode in ('P', 'RGBA') else 'TIFF' if mode == 'CMYK' else 'PNG')
  pixels = decode_image(data, 100)
  expected = np.asarray(image.convert('RGB').resize((100, 100), RESIZE_FILTER))
  assert pixels.shape == (100, 100, 3)
  np.testing.assert_array_equal(pixels, expected)


def test_png_bytes_behind_a_jpg_name_decode(tmp_path):
  path = tmp_path / 'chip.jpg'
  path.write_bytes(_encode(Image.fromarray(_gradient(64)), 'PNG'))
  np.testing.assert_array_equal(decode_image(path.read_bytes(), 64), _gradient(64))


def test_upscales_small_images():
  assert decode_image(_encode(Image.fromarray(_gradient(16)), 'PNG'), 64).shape == (64, 64, 3)


def test_refuses_empty_file():
  assert _refusal(b'') is Reason.EMPTY_FILE


@pytest.mark.parametrize('data', [b'not an image at all', b'%PDF-1.4\n', b'\x00' * 100,
                                  b'image_name,tags\ntrain_0,clear\n'])
def test_refuses_non_images(data):
  assert _refusal(data) is Reason.NOT_AN_IMAGE


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_refuses_truncated_images(fmt):
  data = _encode(Image.fromarray(_gradient()), fmt)
  assert _refusal(data[:len(data) // 2]) is Reason.TRUNCATED_IMAGE


def test_refuses_decompression_bomb_before_decoding():
  tracemalloc.start()
  try:
    assert _refusal(png_declaring(50_000, 50_000)) is Reason.TOO_MANY_PIXELS
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 10 * 2**20, f'refusing a bomb allocated {peak} bytes'


def test_pixel_limit_is_configurable():
  data = _encode(Image.fromarray(_gradient(100)), 'PNG')
  assert _refusal(data, max_pixels=99 * 100) is Reason.TOO_MANY_PIXELS
  assert decode_image(data, 64, max_pixels=100 * 100).shape == (64, 64, 3)


def _grey_ramp_16_bit(height=96, width=128) -> np.ndarray:
  """A 16-bit grey picture using the whole range: a diagonal ramp with a noise texture."""
  y, x = np.mgrid[0:height, 0:width]
  ramp = (x + y) / (width + height - 2)
  noise = np.random.default_rng(0).uniform(-0.05, 0.05, size=ramp.shape)
  return np.rint(np.clip(ramp + noise, 0, 1) * 65535).astype(np.uint16)


@pytest.mark.parametrize('dtype, fmt', [('<u2', 'PNG'), ('<u2', 'TIFF'), ('>u2', 'TIFF'),
                                        ('<i4', 'TIFF')])
def test_16_bit_grey_matches_its_8_bit_copy_and_is_not_white(dtype, fmt):
  sixteen = _grey_ramp_16_bit()
  image = Image.fromarray(sixteen.astype(dtype))
  assert image.mode == {'<u2': 'I;16', '>u2': 'I;16B', '<i4': 'I'}[dtype]
  eight = np.rint(sixteen / 257).astype(np.uint8)
  pixels = decode_image(_encode(image, fmt), 64)
  expected = decode_image(_encode(Image.fromarray(eight), 'PNG'), 64)
  assert abs(pixels.mean() - expected.mean()) < 2
  assert np.abs(pixels.astype(int) - expected).max() <= 1
  assert 100 < pixels.mean() < 155, f'decoded to mean {pixels.mean()}: clipped, not scaled'


def test_16_bit_values_are_rounded_to_8_bits():
  values = np.array([0, 128, 129, 257 * 100 + 128, 257 * 100 + 129, 32896, 65534, 65535])
  expected = np.array([0, 0, 1, 100, 101, 128, 255, 255])
  sixteen = np.repeat(values, 8)[np.newaxis, :].repeat(64, axis=0).astype('<u2')
  pixels = decode_image(_encode(Image.fromarray(sixteen), 'PNG'), 64)
  np.testing.assert_array_equal(pixels[0, ::8, 0], expected)
  np.testing.assert_array_equal(pixels, np.repeat(pixels[..., :1], 3, axis=-1))  # still grey


def test_float_grey_in_0_1_is_scaled_to_0_255():
  values = np.array([0.0, 0.25, 100 / 255, 1.0], dtype=np.float32)
  floats = np.repeat(values, 16)[np.newaxis, :].repeat(64, axis=0)
  pixels = decode_image(_encode(Image.fromarray(floats), 'TIFF'), 64)
  np.testing.assert_array_equal(pixels[0, ::16, 0], [0, 64, 100, 255])


@pytest.mark.parametrize('values', [[0.0, 4095.0], [-0.5, 0.5], [0.0, np.nan], [0.0, np.inf]])
def test_refuses_float_grey_outside_0_1(values):
  floats = np.resize(np.array(values, dtype=np.float32), (32, 32))
  with pytest.raises(InputRefused) as info:
    decode_image(_encode(Image.fromarray(floats), 'TIFF'), 64)
  assert info.value.reason is Reason.UNSUPPORTED_PIXELS
  assert '8- or 16-bit' in info.value.message  # says what to do


@pytest.mark.parametrize('values', [[0, 70_000], [-5, 100]])
def test_refuses_32_bit_integers_outside_16_bits(values):
  ints = np.resize(np.array(values, dtype='<i4'), (32, 32))
  with pytest.raises(InputRefused) as info:
    decode_image(_encode(Image.fromarray(ints), 'TIFF'), 64)
  assert info.value.reason is Reason.UNSUPPORTED_PIXELS
  assert '8- or 16-bit' in info.value.message


def _lopsided(height, width) -> np.ndarray:
  """A smooth picture with no symmetry (so JPEG keeps it well), a marker block top left."""
  y, x = np.mgrid[0:height, 0:width]
  picture = np.stack([255 * x / (width - 1), 255 * y / (height - 1),
                      np.full(x.shape, 60.0)], axis=-1)
  picture[:height // 4, :width // 4] = (250, 250, 250)
  return picture.astype(np.uint8)


# What a viewer does to the stored pixels for each EXIF orientation, from the EXIF specification
# (written with numpy, independently of the decoder's table of Pillow transposes).
DISPLAYED = {
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),  # 90 degrees clockwise.
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),  # 90 degrees anticlockwise.
}


def _with_orientation(stored: np.ndarray, orientation: int, fmt: str) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = orientation
  kwargs = {'quality': 95} if fmt == 'JPEG' else {}
  return _encode(Image.fromarray(stored), fmt, exif=exif, **kwargs)


@pytest.mark.parametrize('orientation', [3, 6, 8])
@pytest.mark.parametrize('shape', [(96, 96), (64, 128)])
def test_exif_orientation_is_applied_to_jpegs(orientation, shape):
  stored = _lopsided(*shape)
  displayed = DISPLAYED[orientation](stored)
  pixels = decode_image(_with_orientation(stored, orientation, 'JPEG'), 48)
  expected = decode_image(_encode(Image.fromarray(displayed), 'JPEG', quality=95), 48)
  unrotated = decode_image(_encode(Image.fromarray(stored), 'JPEG', quality=95), 48)
  assert np.abs(pixels.astype(float) - expected).mean() < 2
  assert np.abs(unrotated.astype(float) - expected).mean() > 20  # so the test can fail


@pytest.mark.parametrize('orientation', sorted(DISPLAYED))
def test_exif_orientation_is_applied_exactly_to_non_square_pngs(orientation):
  stored = _lopsided(32, 64)
  displayed = DISPLAYED[orientation](stored)
  assert displayed.shape[:2] == ((64, 32) if orientation >= 5 else (32, 64))
  pixels = decode_image(_with_orientation(stored, orientation, 'PNG'), 64)
  # Squashed to a square after the rotation, exactly as the displayed picture would be.
  expected = np.asarray(Image.fromarray(displayed).resize((64, 64), RESIZE_FILTER))
  np.testing.assert_array_equal(pixels, expected)


@pytest.mark.parametrize('orientation', [0, 1, 9])
def test_exif_orientation_as_stored_leaves_pixels_alone(orientation):
  stored = _lopsided(64, 64)
  np.testing.assert_array_equal(
      decode_image(_with_orientation(stored, orientation, 'PNG'), 64), stored)


# Above Pillow's own decompression-bomb error (2 x Image.MAX_IMAGE_PIXELS = 178,956,970 pixels).
ABOVE_PILLOWS_LIMIT = (15_000, 12_000)


def test_pixel_limit_can_be_raised_past_pillows_own():
  data = png_declaring(*ABOVE_PILLOWS_LIMIT)
  # No real pixel data behind the header, so it is refused, but not for its size.
  assert _refusal(data, max_pixels=200_000_000) is not Reason.TOO_MANY_PIXELS
  assert _refusal(data) is Reason.TOO_MANY_PIXELS
  assert _refusal(_encode(Image.fromarray(_gradient(40)), 'PNG'),
                  max_pixels=1000) is Reason.TOO_MANY_PIXELS


def test_a_file_is_read_whole_whatever_its_size_and_refused_above_the_limit(tmp_path):
  from beam_jobs.common.image_files import read_image_file
  rng = np.random.default_rng(3)
  for size in (0, 1, 30_000, 3 * 2**20 + 7):   # empty, tiny, a chip, above one read chunk
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / f'f{size}.jpg'
    path.write_bytes(data)
    assert read_image_file(str(path), 64 * 2**20) == data
  with pytest.raises(InputRefused) as refused:
    read_image_file(str(tmp_path / 'f30000.jpg'), 29_999)
  assert refused.value.reason == Reason.FILE_TOO_LARGE


# Multi-band and 16-bit TIFFs: Pillow cannot write these, so a minimal writer makes them.
def _tiff(pixels: np.ndarray, photometric: int = 2, extra_samples: int | None = None) -> bytes:
  """An uncompressed little-endian TIFF of `pixels` ([height, width, samples], uint8 or uint16).

  Tags: width, height, bits per sample, compression (1: none), photometric (2: RGB, 1: grey),
  strip offset, samples per pixel, rows per strip, strip byte count, planar config (1: chunky),
  and ExtraSamples when given (0: unspecified, 1: associated alpha, 2: unassociated alpha).
  """
  height, width, samples = pixels.shape
  bits = pixels.dtype.itemsize * 8
  image_data = pixels.astype(pixels.dtype.newbyteorder('<')).tobytes()
  bits_array = struct.pack(f'<{samples}H', *[bits] * samples)
  bits_offset = 8 + len(image_data)
  ifd_offset = bits_offset + len(bits_array) + (bits_offset + len(bits_array)) % 2

  def entry(tag, kind, count, value):
    inline = struct.pack('<HH', value, 0) if kind == 3 else struct.pack('<I', value)
    return struct.pack('<HHI', tag, kind, count) + inline

  short, long_ = 3, 4
  # Up to two 16-bit values fit in the entry itself; more are stored at an offset.
  bits_entry = (struct.pack('<HHI', 258, short, samples) + bits_array.ljust(4, b'\0')
                if samples <= 2 else struct.pack('<HHII', 258, short, samples, bits_offset))
  entries = [entry(256, short, 1, width), entry(257, short, 1, height), bits_entry,
             entry(259, short, 1, 1), entry(262, short, 1, photometric),
             entry(273, long_, 1, 8), entry(277, short, 1, samples), entry(278, short, 1, height),
             entry(279, long_, 1, len(image_data)), entry(284, short, 1, 1)]
  if extra_samples is not None:
    entries.append(entry(338, short, 1, extra_samples))
  header = b'II*\x00' + struct.pack('<I', ifd_offset)
  body = (image_data + bits_array).ljust(ifd_offset - 8, b'\0')
  return (header + body + struct.pack('<H', len(entries)) + b''.join(entries)
          + struct.pack('<I', 0))


def _bands(samples: int, dtype: str, size: int = 16) -> np.ndarray:
  top = 65535 if dtype == '<u2' else 255
  return np.random.default_rng(samples).integers(0, top, (size, size, samples)).astype(dtype)


def _bands_refusal(data: bytes) -> str:
  with pytest.raises(InputRefused) as info:
    decode_image(data, 64)
  assert info.value.reason is Reason.UNSUPPORTED_BANDS, info.value
  return info.value.message


def test_tiff_writer_makes_what_pillow_reads():
  # So that a refusal below is for the bands, not for a file the writer got wrong.
  pixels = _bands(3, '|u1')
  assert np.array_equal(np.asarray(Image.open(io.BytesIO(_tiff(pixels)))), pixels)
  image = Image.open(io.BytesIO(_tiff(_bands(4, '<u2'), extra_samples=1)))
  assert (image.mode, image.tile[0].args[0]) == ('RGBA', 'RGBa;16L')  # NIR read as alpha.


@pytest.mark.parametrize('extra_samples', [1, None, 0, 2])
def test_refuses_4_band_16_bit_tiffs_like_planets_analytic_chips(extra_samples):
  message = _bands_refusal(_tiff(_bands(4, '<u2'), extra_samples=extra_samples))
  assert 'a 4-band 16-bit TIFF' in message and 'B,G,R,NIR' in message
  assert 'predict the matching JPEG chip' in message
  assert 'convert the TIFF to an 8-bit RGB' in message


@pytest.mark.parametrize('samples, photometric', [(3, 2), (4, 5), (2, 1), (5, 2)])
def test_refuses_every_16_bit_tiff_of_more_than_one_band(samples, photometric):
  # 3-band RGB and CMYK would lose their low byte unrounded; 2 and 5 bands Pillow cannot open
  # (it would say NOT_AN_IMAGE, "expected a JPEG or PNG").
  extra = 2 if samples == 2 else None
  message = _bands_refusal(_tiff(_bands(samples, '<u2'), photometric, extra))
  assert f'a {samples}-band 16-bit TIFF' in message


@pytest.mark.parametrize('extra_samples', [1, 0, None])
def test_refuses_8_bit_tiffs_with_a_band_not_declared_plain_alpha(extra_samples):
  message = _bands_refusal(_tiff(_bands(4, '|u1'), extra_samples=extra_samples))
  assert 'not declared plain alpha' in message and 'convert the TIFF' in message


def test_8_bit_rgba_tiff_with_true_alpha_decodes_like_the_same_png():
  rgba = Image.fromarray(_gradient(64)).convert('RGBA')
  rgba.putalpha(Image.fromarray(_gradient(64)[..., 0]))
  from_png = decode_image(_encode(rgba, 'PNG'), 32)
  np.testing.assert_array_equal(decode_image(_encode(rgba, 'TIFF'), 32), from_png)
  np.testing.assert_array_equal(
      decode_image(_tiff(np.asarray(rgba), extra_samples=2), 32), from_png)


def test_16_bit_grey_tiff_and_8_bit_rgb_tiff_still_decode():
  grey = _grey_ramp_16_bit(32, 32)[..., np.newaxis]
  expected = np.rint(grey[..., 0] / 257).astype(np.uint8)
  np.testing.assert_array_equal(decode_image(_tiff(grey, photometric=1), 32)[..., 0], expected)
  rgb = _gradient(32)
  np.testing.assert_array_equal(decode_image(_tiff(rgb), 32), rgb)


def test_refuses_modes_without_a_faithful_rgb_picture():
  lab = Image.fromarray(_gradient(32)).convert('LAB')
  assert 'LAB' in _bands_refusal(_encode(lab, 'TIFF'))


def test_a_multi_band_tiff_behind_a_jpg_name_is_refused_the_same(tmp_path):
  from beam_jobs.common.image_files import read_image_file
  data = _tiff(_bands(4, '<u2'), extra_samples=1)
  path = tmp_path / 'train_0.jpg'
  path.write_bytes(data)
  assert _bands_refusal(read_image_file(str(path), 2**20)) == _bands_refusal(data)


def test_planets_real_analytic_tiffs_are_refused():
  paths = sorted((PLANET_DIR / 'train-tif').glob('*.tif'))
  if not paths:
    pytest.skip(f'no real Planet TIFFs under {PLANET_DIR}')
  for path in paths:
    assert 'a 4-band 16-bit TIFF' in _bands_refusal(path.read_bytes()), path.name


# JPEGs whose data ends before the picture that their header declares.
def _chip(seed: int = 0) -> Image.Image:
  return draw_chip(['clear', 'primary', 'road'], np.random.default_rng(seed))


JPEG_KINDS = {
    'baseline': lambda image: encode_chip(image, as_cmyk=False),
    'cmyk': lambda image: encode_chip(image, as_cmyk=True),  # as Planet's chips are written
    'progressive': lambda image: _encode(image, 'JPEG', quality=90, progressive=True),
}


def _with_rows_times(jpeg: bytes, factor: int) -> bytes:
  """The JPEG with its start-of-frame height multiplied by `factor`, its data unchanged."""
  pos = 2
  while jpeg[pos + 1] not in (0xC0, 0xC1, 0xC2):
    pos += 2 + int.from_bytes(jpeg[pos + 2:pos + 4], 'big')
  height = int.from_bytes(jpeg[pos + 5:pos + 7], 'big')
  return jpeg[:pos + 5] + (height * factor).to_bytes(2, 'big') + jpeg[pos + 7:]


def _previous_decoder(data: bytes, size: int) -> np.ndarray:
  """What the decoder did before it checked JPEG data for completeness."""
  image = Image.open(io.BytesIO(data))
  image.draft('RGB', (size, size))
  image = image.convert('RGB')
  return np.asarray(image if image.size == (size, size) else image.resize((size, size),
                                                                           RESIZE_FILTER))


def _truncation_message(data: bytes, size: int) -> str:
  with pytest.raises(InputRefused) as info:
    decode_image(data, size)
  assert info.value.reason is Reason.TRUNCATED_IMAGE, info.value
  assert 're-copy it from its source' in info.value.message
  return info.value.message


@pytest.mark.parametrize('size', [256, 64])   # full size, and the draft path (1/4 scale)
@pytest.mark.parametrize('kind', sorted(JPEG_KINDS))
def test_refuses_jpeg_whose_header_declares_4x_the_rows(kind, size):
  data = _with_rows_times(JPEG_KINDS[kind](_chip()), 4)
  # Pillow alone pads the missing rows and returns a picture: the case this check exists for.
  assert _previous_decoder(data, size).shape == (size, size, 3)
  assert '256x1024 picture its header declares' in _truncation_message(data, size)


@pytest.mark.parametrize('size', [256, 64])
@pytest.mark.parametrize('kind', sorted(JPEG_KINDS))
def test_refuses_jpeg_cut_in_half_with_or_without_an_end_marker(kind, size):
  data = JPEG_KINDS[kind](_chip())
  half = data[:len(data) // 2]
  _truncation_message(half, size)
  _truncation_message(half + b'\xff\xd9', size)


@pytest.mark.parametrize('size', [256, 128, 32])
@pytest.mark.parametrize('kind', sorted(JPEG_KINDS))
def test_whole_jpegs_decode_as_before(kind, size):
  for seed in range(3):
    data = JPEG_KINDS[kind](_chip(seed))
    np.testing.assert_array_equal(decode_image(data, size), _previous_decoder(data, size))


@pytest.mark.parametrize('kind', sorted(JPEG_KINDS))
def test_a_whole_jpeg_with_a_flat_last_block_decodes_and_a_short_one_is_refused(kind):
  # A flat corner (a no-data border, a saturated cloud) is what a padded scan looks like too, so
  # these take the second decode: whole, it must change nothing; short, it must refuse.
  pixels = np.array(_chip())
  pixels[-64:] = (0, 0, 0)
  data = JPEG_KINDS[kind](Image.fromarray(pixels))
  for size in (256, 64):
    decoded = decode_image(data, size)
    np.testing.assert_array_equal(decoded, _previous_decoder(data, size))
    assert (decoded[-1, -1] == decoded[-1, -2]).all()  # flat, so this case is what it says
    _truncation_message(_with_rows_times(data, 2), size)
