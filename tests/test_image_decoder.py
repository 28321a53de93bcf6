"""The one decoder: correct colours for every image kind, typed refusals for every bad input."""
import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from beam_jobs.image_decoder import RESIZE_FILTER, decode_image
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


def test_real_chips_match_pillow_and_are_not_black(real_chips):
  assert len(real_chips) == 6
  for path in real_chips:
    data = path.read_bytes()
    pixels = decode_image(data, 128)
    reference = np.asarray(Image.open(path).convert('RGB').resize((128, 128), RESIZE_FILTER))
    assert pixels.shape == (128, 128, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(float) - reference).mean() < 1.0, path.name
    assert pixels.mean() > 20, f'{path.name} decoded (nearly) black'


def test_real_chips_are_black_in_tensorflow(real_chips):
  # The reason the project has its own decoder: this must stay true, or the premise changed.
  import tensorflow as tf
  assert tf.io.decode_jpeg(real_chips[0].read_bytes()).numpy().max() == 0


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
