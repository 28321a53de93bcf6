r"""The original tutorial's ways, kept as its users wrote them: its input Sequence and its serving client.

Usage: python -m benchmarks.baselines --data_dir PREP_OUT --images_dir DIR --labels_csv CSV \
           [--real_chips_dir ../shared/planet/train-jpg] [--epochs 3] [--batch_size 32]

`KagglePlanetSequence` reproduces the ML6 tutorial's ("Training and Serving ML models with
tf.keras", sdcubber/keras-training-serving) `tf.keras.utils.Sequence`: every batch opens each JPEG
with Pillow (`load_img(path, target_size=...)`), converts it to float32 / 255, and slices the
label lists; the tutorial fits with `workers=1`. Both pipelines are timed over the same chips:
images per second delivered to a consumer that does nothing, so the figure is the input rate alone.

`predict_one_float_image_per_request` reproduces the tutorial's TF Serving client: each image is
loaded with `load_img`, scaled to float32 / 255 and sent alone, as a `[1, H, W, 3]` float32
`input_image` tensor (`tf.make_tensor_proto`) in its own `PredictRequest`, waiting for each answer.
`python -m benchmarks` times it against the project's gRPC prediction job.
"""
import argparse
import ast
import csv
import math
import os
import random
import time

import keras
import numpy as np

from model import dataset as dataset_lib
from model import schema


def load_image(image_path, size):
  return keras.utils.img_to_array(keras.utils.load_img(image_path, target_size=(size, size))) / 255.


class KagglePlanetSequence(keras.utils.Sequence):
  """The tutorial's Sequence, kept as written (its per-epoch shuffle never reaches a batch)."""

  def __init__(self, rows, data_path, im_size, batch_size, mode='train'):
    super().__init__()
    self.batch_size, self.im_size, self.mode = batch_size, im_size, mode
    self.wlabels = [ast.literal_eval(r['weather_labels']) for r in rows]
    self.glabels = [ast.literal_eval(r['ground_labels']) for r in rows]
    self.image_list = [os.path.join(data_path, r['image_name'] + '.jpg') for r in rows]

  def __len__(self):
    return int(math.ceil(len(self.image_list) / float(self.batch_size)))

  def on_epoch_end(self):
    self.indexes = range(len(self.image_list))
    if self.mode == 'train':
      self.indexes = random.sample(self.indexes, k=len(self.indexes))

  def get_batch_labels(self, idx):
    return [self.wlabels[idx * self.batch_size: (idx + 1) * self.batch_size],
            self.glabels[idx * self.batch_size: (idx + 1) * self.batch_size]]

  def get_batch_features(self, idx):
    batch_images = self.image_list[idx * self.batch_size: (1 + idx) * self.batch_size]
    return np.array([load_image(im, self.im_size) for im in batch_images])

  def __getitem__(self, idx):
    return self.get_batch_features(idx), self.get_batch_labels(idx)


def tutorial_rows(labels_csv: str) -> list[dict]:
  """A Kaggle train_v2.csv as the tutorial's KagglePlanetMCML.csv rows (label lists as strings)."""
  rows = []
  with open(labels_csv, newline='') as f:
    for row in csv.DictReader(f):
      tags = set(row['tags'].split())
      rows.append({'image_name': row['image_name'],
                   'weather_labels': str([int(l in tags) for l in schema.WEATHER_LABELS]),
                   'ground_labels': str([int(l in tags) for l in schema.GROUND_LABELS])})
  return rows


def sequence_rate(sequence, epochs: int) -> float:
  """Images per second through `sequence[i]` for every batch, `epochs` times (as fit with workers=1)."""
  images, start = 0, time.perf_counter()
  for _ in range(epochs):
    for i in range(len(sequence)):
      images += len(sequence[i][0])
    sequence.on_epoch_end()
  return images / (time.perf_counter() - start)


def tf_data_rate(dataset, steps: int, epochs: int) -> float:
  """Images per second through model.dataset's endless training stream, as fit consumes it.

  One untimed epoch first: it fills the shuffle buffer and traces the functions once, as the
  first epoch of a training run does.
  """
  iterator = iter(dataset)
  for _ in range(steps):
    next(iterator)
  images, start = 0, time.perf_counter()
  for _ in range(steps * epochs):
    images += int(next(iterator)[0].shape[0])
  return images / (time.perf_counter() - start)


def predict_one_float_image_per_request(address: str, image_paths: list[str], size: int,
                                        model_name: str = schema.MODEL_NAME) -> list[dict]:
  """The tutorial's client: one float32 image per PredictRequest to `predict_float`, in turn."""
  import grpc  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # pylint: disable=import-outside-toplevel
  stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(address))
  answers = []
  for path in image_paths:
    image = load_image(path, size)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = schema.FLOAT_SIGNATURE
    request.inputs[schema.INPUT_FLOAT].CopyFrom(
        tf.make_tensor_proto(image, shape=[1] + list(image.shape), dtype=tf.float32))
    response = stub.Predict(request, 10.0)
    answers.append({name: tf.make_ndarray(response.outputs[name])[0]
                    for name in (schema.OUTPUT_WEATHER, schema.OUTPUT_GROUND)})
  return answers


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', required=True, help='a beam_jobs.preprocess output')
  parser.add_argument('--images_dir', required=True, help='the JPEGs it was made from')
  parser.add_argument('--labels_csv', required=True, help='their Kaggle labels CSV')
  parser.add_argument('--real_chips_dir',
                      help='also run the Sequence over these JPEGs, cycled to the same count (the '
                           'real chips are CMYK JPEGs, slower to decode than the sample chips)')
  parser.add_argument('--epochs', type=int, default=3)
  parser.add_argument('--batch_size', type=int, default=32)
  args = parser.parse_args(argv)

  data = dataset_lib.load_prepared(args.data_dir)
  rows = tutorial_rows(args.labels_csv)
  steps = dataset_lib.steps_per_epoch(data, 'train', args.batch_size)
  sequence = KagglePlanetSequence(rows, args.images_dir, data.image_size, args.batch_size)
  figures = {
      'image_size': data.image_size,
      'sequence_images': len(rows),
      'tf_data_images': data.counts['train'],
      'sequence_pillow_per_batch': sequence_rate(sequence, args.epochs),
      'tf_data_augmented': tf_data_rate(dataset_lib.make_dataset(
          data, 'train', args.batch_size, training=True, augment=True), steps, args.epochs),
      'tf_data_no_augment': tf_data_rate(dataset_lib.make_dataset(
          data, 'train', args.batch_size, training=True, augment=False), steps, args.epochs),
  }
  figures['speedup'] = figures['tf_data_augmented'] / figures['sequence_pillow_per_batch']
  if args.real_chips_dir:
    chips = sorted(p[:-len('.jpg')] for p in os.listdir(args.real_chips_dir) if p.endswith('.jpg'))
    cycled = [{'image_name': chips[i % len(chips)], 'weather_labels': '[1, 0, 0, 0]',
               'ground_labels': str([0] * schema.NUM_GROUND)} for i in range(len(rows))]
    figures['sequence_on_real_chips'] = sequence_rate(KagglePlanetSequence(
        cycled, args.real_chips_dir, data.image_size, args.batch_size), args.epochs)
    figures['speedup_real_chips'] = figures['tf_data_augmented'] / figures['sequence_on_real_chips']
  for name, value in figures.items():
    print(f'{name:28s} {value:12.1f}' if isinstance(value, float) else f'{name:28s} {value:12d}')


if __name__ == '__main__':
  main()
