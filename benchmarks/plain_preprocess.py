"""The strong opponent of the preprocess job: the short every-core script a user would write.

`multiprocessing.Pool(os.cpu_count())`; the CSV read with the csv module; each worker takes an
equal slice of the rows, decodes each JPEG with Pillow (open, draft('RGB', (size, size)),
convert('RGB'), resize with Image.BOX to size x size), serialises a uint8 `tf.train.Example` with
the job's features (image/name, image/sha256 of the file, image/pixels, image/shape,
label/weather, label/ground: model/schema.py) and writes its own TFRecord file,
OUTPUT_DIR/part-WWWWW.tfrecord[.gz]. No dead letters (a bad file stops it), no duplicate rule
(a later row of a name wins), no train/eval split, no EXIF orientation or 16-bit handling, no
manifest. Its pixels equal the job's for 8-bit JPEG chips without an EXIF orientation tag.

Usage:
  python -m benchmarks.plain_preprocess --labels_csv CSV --images_dir DIR --output_dir DIR \
      [--workers N] [--image_size 128] [--compression none|gzip]
Prints one JSON line: {"images": n, "seconds": s, "bytes": total_bytes} (seconds from the CSV
read to the last file closed; the imports before it are not counted).
"""
import argparse
import csv
import hashlib
import io
import json
import multiprocessing
import os
import time

import tensorflow as tf
from PIL import Image

from model import schema

__all__ = ['convert', 'main']

_WEATHER = {label: i for i, label in enumerate(schema.WEATHER_LABELS)}
_GROUND = {label: i for i, label in enumerate(schema.GROUND_LABELS)}


def _bytes(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _floats(values) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def _example(name: str, tags: str, data: bytes, size: int) -> bytes:
  image = Image.open(io.BytesIO(data))
  image.draft('RGB', (size, size))
  image = image.convert('RGB')
  if image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.BOX)
  weather, ground = [0.0] * len(_WEATHER), [0.0] * len(_GROUND)
  for tag in tags.split():
    if tag in _WEATHER:
      weather[_WEATHER[tag]] = 1.0
    else:
      ground[_GROUND[tag]] = 1.0
  return tf.train.Example(features=tf.train.Features(feature={
      schema.KEY_NAME: _bytes(name.encode()),
      schema.KEY_SHA256: _bytes(hashlib.sha256(data).hexdigest().encode()),
      schema.KEY_PIXELS: _bytes(image.tobytes()),
      schema.KEY_SHAPE: tf.train.Feature(int64_list=tf.train.Int64List(
          value=[size, size, schema.CHANNELS])),
      schema.KEY_WEATHER: _floats(weather),
      schema.KEY_GROUND: _floats(ground),
  })).SerializeToString()


def _write_part(task) -> int:
  """One worker's slice of rows -> its own TFRecord file; returns the file's size."""
  path, rows, images_dir, size, compression = task
  options = tf.io.TFRecordOptions(compression_type='GZIP' if compression == 'gzip' else '')
  with tf.io.TFRecordWriter(path, options) as writer:
    for name, tags in rows:
      with open(os.path.join(images_dir, name + '.jpg'), 'rb') as f:
        data = f.read()
      writer.write(_example(name, tags, data, size))
  return os.path.getsize(path)


def convert(labels_csv: str, images_dir: str, output_dir: str, workers: int, image_size: int,
            compression: str) -> dict:
  """Runs the script's work; returns {'images', 'seconds', 'bytes'}."""
  started = time.perf_counter()
  with open(labels_csv, newline='', encoding='utf-8') as f:
    reader = csv.reader(f)
    next(reader)
    rows = [(row[0], row[1]) for row in reader]
  os.makedirs(output_dir, exist_ok=True)
  suffix = schema.SHARD_SUFFIXES[compression]
  tasks = [(os.path.join(output_dir, f'part-{w:05d}{suffix}'), rows[w::workers], images_dir,
            image_size, compression) for w in range(workers)]
  with multiprocessing.Pool(workers) as pool:
    sizes = pool.map(_write_part, tasks)
  return {'images': len(rows), 'seconds': round(time.perf_counter() - started, 3),
          'bytes': sum(sizes)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--labels_csv', required=True)
  parser.add_argument('--images_dir', required=True)
  parser.add_argument('--output_dir', required=True)
  parser.add_argument('--workers', type=int, default=os.cpu_count())
  parser.add_argument('--image_size', type=int, default=schema.DEFAULT_IMAGE_SIZE)
  # The job's default is uncompressed too.
  parser.add_argument('--compression', choices=schema.COMPRESSIONS, default='none')
  args = parser.parse_args(argv)
  print(json.dumps(convert(args.labels_csv, args.images_dir, args.output_dir, args.workers,
                           args.image_size, args.compression)))


if __name__ == '__main__':
  main()
