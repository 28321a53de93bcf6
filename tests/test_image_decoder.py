"""The one decoder: correct colours for every image kind, typed refusals for every bad input."""
import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from beam_jobs.common.image_decoder import RESIZE_FILTER, decode_image
from model.errors import InputRefused, Reason
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
