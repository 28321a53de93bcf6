"""Training input: model.dataset's tf.data pipeline beside the tutorial's Sequence, and the step rate.

Usage: python -m benchmarks --only training [--quick] [--work /tmp/planet_bench]
       (the same figures as the training part of `python -m benchmarks`; needs the preprocess
       part's output, which it makes when missing)

Figures, on the big chip set and its preprocess output (128 px, batch 32):
  sequence_pillow_per_batch: the tutorial's KagglePlanetSequence (benchmarks/baselines.py), every
                  batch indexed once, as `fit(workers=1)` does: images/s delivered, no model.
  tf_data_augmented, tf_data_no_augment: model.dataset.make_dataset's endless training stream
                  (parse, flips/rotations, batch), no model.
  train_step_real_pipeline: model.fit steps of the project's network (model.train's compile)
                  fed by the augmented tf.data pipeline.
  train_step_in_memory: the same network fed numpy arrays already in memory
                  (`fit(x, y, batch_size=32)`): the step rate with no input cost, the limit.
Training rates count only steps after `train_warmup_steps` (tracing, shuffle buffer filled).
"""
import os
import time

import numpy as np

from benchmarks import baselines, workspace
from benchmarks.measure_preprocess import prepared_dir
from benchmarks.plan import Plan, loop_figures, median, ratio

BATCH_SIZE = 32


class _StepClock:
  """Keras callback: the time of each batch end, so warm-up steps can be left out."""

  def __init__(self):
    import keras  # pylint: disable=import-outside-toplevel

    class Callback(keras.callbacks.Callback):

      def __init__(self, clock):
        super().__init__()
        self.clock = clock

      def on_train_batch_end(self, batch, logs=None):
        self.clock.ends.append(time.perf_counter())

    self.ends: list[float] = []
    self.callback = Callback(self)

  def seconds_after(self, warmup: int) -> float:
    return self.ends[-1] - self.ends[warmup - 1]


def _build_model(seed: int):
  import keras  # pylint: disable=import-outside-toplevel
  from model.network import build_model  # pylint: disable=import-outside-toplevel
  from model.training_model import compile_model  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(seed)
  return compile_model(build_model(workspace.IMAGE_SIZE), 1e-3)


def _arrays_in_memory(data, count: int):
  """`count` train examples as numpy arrays (repeated when the split is smaller)."""
  from model import dataset as dataset_lib  # pylint: disable=import-outside-toplevel
  images, weather, ground = [], [], []
  for batch_images, targets, _ in dataset_lib.make_dataset(data, 'train', BATCH_SIZE, training=False):
    images.append(batch_images.numpy())
    weather.append(targets['weather'].numpy())
    ground.append(targets['ground'].numpy())
    if sum(len(i) for i in images) >= count:
      break
  index = np.resize(np.arange(sum(len(i) for i in images)), count)
  return (np.concatenate(images)[index],
          {'weather': np.concatenate(weather)[index], 'ground': np.concatenate(ground)[index]})


def measure(plan: Plan, work: str, log=print) -> dict:
  from model import dataset as dataset_lib  # pylint: disable=import-outside-toplevel
  if not os.path.exists(os.path.join(prepared_dir(work), 'manifest.json')):
    from benchmarks import commands  # pylint: disable=import-outside-toplevel
    from benchmarks.measure_preprocess import command  # pylint: disable=import-outside-toplevel
    commands.run_command(command('job_in_process', workspace.chips(work, plan.big),
                                 prepared_dir(work)), in_process=plan.commands_in_process)
  chips = workspace.chips(work, plan.big)
  data = dataset_lib.load_prepared(prepared_dir(work))
  sequence = baselines.KagglePlanetSequence(
      baselines.tutorial_rows(os.path.join(chips, 'train_v2.csv')),
      os.path.join(chips, 'train-jpg'), data.image_size, BATCH_SIZE)
  steps = plan.train_warmup_steps + plan.train_steps
  x, y = _arrays_in_memory(data, steps * BATCH_SIZE)
  models = {'real_pipeline': _build_model(0), 'in_memory': _build_model(0)}

  seconds = {k: [] for k in ('sequence', 'tf_data_augmented', 'tf_data_no_augment',
                             'real_pipeline', 'in_memory')}
  for repeat in range(plan.repeats):
    started = time.perf_counter()
    baselines.sequence_rate(sequence, epochs=1)
    seconds['sequence'].append(time.perf_counter() - started)
    for augment in (True, False):
      dataset = dataset_lib.make_dataset(data, 'train', BATCH_SIZE, training=True, augment=augment)
      images_per_s = baselines.tf_data_rate(dataset, plan.input_batches, epochs=1)
      seconds['tf_data_augmented' if augment else 'tf_data_no_augment'].append(
          plan.input_batches * BATCH_SIZE / images_per_s)
    for kind, model in models.items():
      clock = _StepClock()
      if kind == 'real_pipeline':
        model.fit(dataset_lib.make_dataset(data, 'train', BATCH_SIZE, training=True),
                  epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0,
                  callbacks=[clock.callback])
      else:
        model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, shuffle=True, verbose=0,
                  callbacks=[clock.callback])
      seconds[kind].append(clock.seconds_after(plan.train_warmup_steps))
    log(f'  training run {repeat + 1}: sequence {len(sequence.image_list) / seconds["sequence"][-1]:.0f}'
        f', tf.data {plan.input_batches * BATCH_SIZE / seconds["tf_data_augmented"][-1]:.0f} images/s'
        f'; steps real {plan.train_steps / seconds["real_pipeline"][-1]:.2f}/s, in memory '
        f'{plan.train_steps / seconds["in_memory"][-1]:.2f}/s')

  timed_images = plan.train_steps * BATCH_SIZE
  figures = {
      'batch_size': BATCH_SIZE,
      'sequence_pillow_per_batch': loop_figures(len(sequence.image_list), seconds['sequence']),
      'tf_data_augmented': loop_figures(plan.input_batches * BATCH_SIZE,
                                        seconds['tf_data_augmented']),
      'tf_data_no_augment': loop_figures(plan.input_batches * BATCH_SIZE,
                                         seconds['tf_data_no_augment']),
      'train_step_real_pipeline': loop_figures(timed_images, seconds['real_pipeline']),
      'train_step_in_memory': loop_figures(timed_images, seconds['in_memory']),
  }
  for kind in ('train_step_real_pipeline', 'train_step_in_memory'):
    figures[kind]['steps_per_s'] = plan.train_steps / median(
        seconds[kind.replace('train_step_', '')])
  figures['ratios'] = {
      'tf_data_vs_sequence': ratio(figures['tf_data_augmented']['images_per_s'],
                                   figures['sequence_pillow_per_batch']['images_per_s']),
      'tf_data_no_augment_vs_sequence': ratio(figures['tf_data_no_augment']['images_per_s'],
                                              figures['sequence_pillow_per_batch']['images_per_s']),
      'real_pipeline_vs_in_memory': ratio(figures['train_step_real_pipeline']['images_per_s'],
                                          figures['train_step_in_memory']['images_per_s']),
  }
  return figures
