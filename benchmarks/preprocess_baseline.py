"""The one-process way to make TFRecords from chips, as the ML6 tutorial era did it: the baseline.

Reproduces the plain loop the preprocess job replaces: for each CSV row, Pillow decodes the
JPEG at full size (256x256, no draft), resizes to the model's size (Pillow's default bicubic),
scales to float32 in [0, 1] (the tutorial's `input_image`) and writes a tf.train.Example with a
float_list of pixels through one tf.io.TFRecordWriter. No dead letters: a bad file stops it.

Usage: python -m benchmarks.preprocess_baseline --labels_csv CSV --images_dir DIR --output FILE
"""
import argparse
import os
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from beam_jobs.common.labels import parse_label_file
from model import schema


def _floats(values) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def convert(labels_csv: str, images_dir: str, output: str, image_size: int = 128) -> dict:
  """Runs the loop; returns {'images', 'seconds', 'bytes', 'images_per_second'}."""
  rows, _ = parse_label_file(labels_csv)
  started = time.perf_counter()
  with tf.io.TFRecordWriter(output) as writer:
    for name, row in rows.items():
      image = Image.open(os.path.join(images_dir, name + '.jpg')).convert('RGB')
      image = image.resize((image_size, image_size))
      pixels = np.asarray(image, dtype=np.float32) / 255.0
      example = tf.train.Example(features=tf.train.Features(feature={
          'image': _floats(pixels.ravel()),
          schema.KEY_WEATHER: _floats(row.weather),
          schema.KEY_GROUND: _floats(row.ground),
      }))
      writer.write(example.SerializeToString())
  seconds = time.perf_counter() - started
  return {'images': len(rows), 'seconds': seconds, 'bytes': os.path.getsize(output),
          'images_per_second': len(rows) / seconds}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--labels_csv', required=True)
  parser.add_argument('--images_dir', required=True)
  parser.add_argument('--output', required=True)
  parser.add_argument('--image_size', type=int, default=schema.DEFAULT_IMAGE_SIZE)
  args = parser.parse_args(argv)
  result = convert(args.labels_csv, args.images_dir, args.output, args.image_size)
  print(f'baseline: {result["images"]} images in {result["seconds"]:.1f} s '
        f'({result["images_per_second"]:.1f}/s), {result["bytes"] / 2**20:.1f} MiB')


if __name__ == '__main__':
  main()
