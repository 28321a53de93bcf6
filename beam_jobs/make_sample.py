"""Writes a deterministic sample of Planet-like chips and their labels, for tests and demos.

Usage: python -m beam_jobs.make_sample --output_dir DIR --count N --seed S [--prefix train]

Writes DIR/train-jpg/<prefix>_<i>.jpg (256x256) and DIR/train_v2.csv (Kaggle format). Labels
follow the real label frequencies; the pixels are drawn from the labels (canopy texture, fields,
roads, rivers, haze, clouds...) so a small CNN can learn them. About one chip in ten is a
4-component JPEG with no colour marker, as the real chips are, so every stage meets that case.
"""
import io
import logging

import numpy as np
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageDraw, ImageFilter

from model import command_line, schema

__all__ = [
    'CHIP_SIZE', 'CMYK_SHARE', 'draw_chip', 'encode_chip', 'main', 'make_sample', 'REAL_ROWS',
    'REAL_TAG_COUNTS', 'sample_tags', 'strip_adobe_marker'
]

CHIP_SIZE = 256
CMYK_SHARE = 0.1

# Tag counts in the real train_v2.csv (40,479 rows; see shared/planet/README.md).
REAL_ROWS = 40479
REAL_TAG_COUNTS = {
    'primary': 37513, 'clear': 28431, 'agriculture': 12315, 'road': 8071, 'water': 7411,
    'partly_cloudy': 7261, 'cultivation': 4547, 'habitation': 3660, 'haze': 2697,
    'cloudy': 2089, 'bare_ground': 862, 'selective_logging': 340, 'artisinal_mine': 339,
    'blooming': 332, 'slash_burn': 209, 'blow_down': 101, 'conventional_mine': 100,
}


def sample_tags(rng: np.random.Generator) -> list[str]:
  """Draws one image's tags: exactly one weather tag, ground tags by their real frequency.

  `cloudy` never appears with another tag in the real data, so ground tags are drawn only for the
  other weathers, each with its frequency among non-cloudy rows (which keeps the marginals real).
  """
  weather_counts = np.array([REAL_TAG_COUNTS[w] for w in schema.WEATHER_LABELS], dtype=float)
  weather = schema.WEATHER_LABELS[rng.choice(len(weather_counts), p=weather_counts / weather_counts.sum())]
  if weather == 'cloudy':
    return [weather]
  not_cloudy = REAL_ROWS - REAL_TAG_COUNTS['cloudy']
  draws = rng.random(schema.NUM_GROUND)
  return [weather] + [g for g, u in zip(schema.GROUND_LABELS, draws)
                      if u < REAL_TAG_COUNTS[g] / not_cloudy]


def _blobs(rng, low_res: int, size: int = CHIP_SIZE) -> np.ndarray:
  """Smooth random field in [0, 1]: low-resolution noise upsampled, like canopy or cloud."""
  noise = (rng.random((low_res, low_res)) * 255).astype(np.uint8)
  return np.asarray(Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC),
                    dtype=np.float32) / 255.0


def _random_path(rng, steps: int, wiggle: float) -> list[tuple[float, float]]:
  x, y = rng.uniform(0, CHIP_SIZE, 2)
  angle = rng.uniform(0, 2 * np.pi)
  points = []
  for _ in range(steps):
    points.append((float(x), float(y)))
    angle += rng.normal(0, wiggle)
    x += np.cos(angle) * CHIP_SIZE / steps * 1.6
    y += np.sin(angle) * CHIP_SIZE / steps * 1.6
  return points


def draw_chip(tags: list[str], rng: np.random.Generator) -> Image.Image:
  """Paints a 256x256 RGB chip whose content follows its tags."""
  tags = set(tags)
  base = np.array((34, 72, 38) if 'primary' in tags else (112, 104, 72), dtype=np.float32)
  canopy = _blobs(rng, 24)[..., None]
  pixels = base * (0.75 + 0.5 * canopy)
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)

  def box(min_side, max_side):
    w, h = rng.integers(min_side, max_side, 2)
    x, y = rng.integers(0, CHIP_SIZE - min_side, 2)
    return [int(x), int(y), int(x + w), int(y + h)]

  if 'agriculture' in tags:
    for _ in range(rng.integers(2, 5)):
      draw.rectangle(box(40, 110), fill=(158, 176, 86))
  if 'cultivation' in tags:
    for _ in range(rng.integers(3, 7)):
      draw.ellipse(box(12, 34), fill=(146, 104, 62))
  if 'bare_ground' in tags:
    draw.ellipse(box(60, 130), fill=(196, 166, 124))
  if 'conventional_mine' in tags:
    draw.rectangle(box(70, 120), fill=(176, 132, 100))
    draw.rectangle(box(20, 40), fill=(90, 90, 96))
  if 'artisinal_mine' in tags:
    for _ in range(rng.integers(4, 8)):
      draw.ellipse(box(8, 20), fill=(204, 124, 60))
      draw.ellipse(box(6, 12), fill=(84, 166, 150))
  if 'blow_down' in tags:
    x0, y0, _, _ = box(60, 61)
    for k in range(0, 60, 6):
      draw.line([(x0 + k, y0), (x0 + k + 40, y0 + 40)], fill=(150, 160, 110), width=2)
  if 'selective_logging' in tags:
    for _ in range(3):
      draw.line(_random_path(rng, 12, 0.5), fill=(124, 92, 60), width=2)
  if 'slash_burn' in tags:
    for _ in range(rng.integers(3, 6)):
      draw.ellipse(box(14, 30), fill=(38, 30, 30))
  if 'water' in tags:
    draw.line(_random_path(rng, 10, 0.35), fill=(40, 62, 112), width=int(rng.integers(8, 16)))
  if 'road' in tags:
    for _ in range(rng.integers(1, 3)):
      draw.line(_random_path(rng, 4, 0.1), fill=(206, 186, 146), width=3)
  if 'habitation' in tags:
    cx, cy = rng.integers(40, CHIP_SIZE - 40, 2)
    for _ in range(rng.integers(10, 20)):
      x, y = cx + rng.integers(-36, 36), cy + rng.integers(-36, 36)
      draw.rectangle([int(x), int(y), int(x + 5), int(y + 5)], fill=(190, 186, 180))
  if 'blooming' in tags:
    for _ in range(40):
      x, y = rng.integers(0, CHIP_SIZE - 3, 2)
      draw.ellipse([int(x), int(y), int(x + 3), int(y + 3)], fill=(226, 204, 84))

  pixels = np.asarray(image, dtype=np.float32)
  white = np.array((236, 236, 240), dtype=np.float32)
  if 'haze' in tags:
    pixels = pixels * 0.5 + np.array((196, 198, 210), dtype=np.float32) * 0.5
  elif 'partly_cloudy' in tags:
    cover = np.clip((_blobs(rng, 6) - 0.55) * 4.0, 0, 1)[..., None]
    pixels = pixels * (1 - cover) + white * cover
  elif 'cloudy' in tags:
    cover = (0.82 + 0.18 * _blobs(rng, 8))[..., None]
    pixels = pixels * (1 - cover) + white * cover
  pixels += rng.normal(0, 6, pixels.shape).astype(np.float32)
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  return image.filter(ImageFilter.SMOOTH) if 'haze' in tags else image


def strip_adobe_marker(jpeg: bytes) -> bytes:
  """Removes the APP14 'Adobe' segment, leaving a 4-component JPEG with no colour marker.

  That is how the real Planet chips are written, and why TensorFlow decodes them as black.
  """
  out = bytearray(jpeg[:2])   # SOI
  pos = 2
  while pos + 4 <= len(jpeg) and jpeg[pos] == 0xFF and jpeg[pos + 1] != 0xDA:
    length = int.from_bytes(jpeg[pos + 2:pos + 4], 'big')
    if jpeg[pos + 1] != 0xEE:
      out += jpeg[pos:pos + 2 + length]
    pos += 2 + length
  return bytes(out + jpeg[pos:])


def encode_chip(image: Image.Image, as_cmyk: bool) -> bytes:
  buffer = io.BytesIO()
  if as_cmyk:
    image.convert('CMYK').save(buffer, 'JPEG', quality=92)
    return strip_adobe_marker(buffer.getvalue())
  image.save(buffer, 'JPEG', quality=92)
  return buffer.getvalue()


def make_sample(output_dir: str, count: int, seed: int, prefix: str = 'train') -> list[tuple[str, list[str]]]:
  """Writes `count` chips and their labels CSV under `output_dir`; returns (name, tags) rows.

  Each chip's randomness comes from (seed, index) alone, so chip i is the same whatever `count`.
  """
  images_dir = FileSystems.join(output_dir, 'train-jpg')
  FileSystems.mkdirs(images_dir) if not FileSystems.exists(images_dir) else None
  rows = []
  for index in range(count):
    rng = np.random.default_rng([seed, index])
    tags = sample_tags(rng)
    name = f'{prefix}_{index}'
    data = encode_chip(draw_chip(tags, rng), as_cmyk=rng.random() < CMYK_SHARE)
    with FileSystems.create(FileSystems.join(images_dir, name + '.jpg')) as f:
      f.write(data)
    rows.append((name, tags))
  csv_text = 'image_name,tags\n' + ''.join(f'{n},{" ".join(t)}\n' for n, t in rows)
  with FileSystems.create(FileSystems.join(output_dir, 'train_v2.csv')) as f:
    f.write(csv_text.encode('utf-8'))
  return rows


def main(argv=None):
  parser = command_line.ArgumentParser(prog='python -m beam_jobs.make_sample',
                                       description=__doc__.split('\n')[0])
  parser.add_argument('--output_dir', type=command_line.user_path, required=True)
  parser.add_argument('--count', type=int, default=500)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--prefix', default='train', help='image names are <prefix>_<index>')
  args = parser.parse_args(argv)
  if args.count < 1:
    parser.error('--count must be at least 1')
  make_sample(args.output_dir, args.count, args.seed, args.prefix)
  logging.info('wrote %d chips and train_v2.csv to %s', args.count, args.output_dir)
  print(f'make_sample: wrote {args.count} chips to {args.output_dir}/train-jpg and '
        f'{args.output_dir}/train_v2.csv')


if __name__ == '__main__':
  command_line.quiet_third_party()
  main()
