r"""Trains the two-headed Planet model on a preprocess output, evaluates it, and exports it.

Usage:
  python -m model.train --data_dir PREP_OUT --job_dir JOB --export_base EXPORT \
      [--epochs 10] [--batch_size 32] [--learning_rate 1e-3] [--patience 3] [--resume] \
      [--no_augment] [--image_size 128] [--architecture model.network:tutorial_cnn]
  Transfer learning from a keras.applications backbone, its head trained first:
  python -m model.train ... --architecture mobilenet_v2 --backbone_weights NO_TOP.h5 \
      --frozen_epochs 2 [--fine_tune_learning_rate 1e-4]

Writes JOB/checkpoints/epoch_NNN.keras (model + optimizer, every epoch), JOB/logs/ (TensorBoard),
JOB/history.json (per-epoch losses, kept across --resume), JOB/metrics.json (eval F2: honest on
the test half of eval, tuned on its tuning half; per-label scores, tuned ground thresholds, the
prior-only baseline), the next EXPORT/PlanetModel/<N>/, and JOB/manifest.json last.
"""
from model import command_line

if __name__ == '__main__':
  # Before TensorFlow loads: its C++ libraries log as they load (model/command_line.py).
  command_line.quiet_third_party()

# pylint: disable=wrong-import-position,wrong-import-order
import argparse
import logging
import os

import numpy as np
import tensorflow as tf
import keras

from model import export as export_lib
from model import dataset as dataset_lib
from model import manifest as manifest_lib
from model import network
from model import schema
from model.evaluation import describe_evaluation, evaluate, predict_split
from model.folder_claim import hold_folder
from model.output_dir import check_outputs_apart
from model.output_layout import OutputLayout, OutputRefused, refuse_unknown_files
from model.train_callbacks import EpochHistory, EpochSummaries, ResumableEarlyStopping, read_history
from model.train_flags import fit_verbosity, parse_args
from model.training_model import (CHECKPOINT_PATTERN, checkpoint_dir, list_checkpoints,
                                  restore_or_build, set_backbone_frozen)
# pylint: enable=wrong-import-position,wrong-import-order

__all__ = ['check_output_folders', 'JOB_LAYOUT', 'main', 'train']

# Everything model.train writes in JOB: a JOB holding anything else is refused.
JOB_LAYOUT = OutputLayout(schema.STAGE_TRAIN, (
    'checkpoints/epoch_???.keras', 'history.json', 'history.json.tmp', 'metrics.json',
    'metrics.json.tmp', 'logs/train/events.out.tfevents.*',
    'logs/validation/events.out.tfevents.*'))


def check_output_folders(args: argparse.Namespace) -> None:
  """Refuses, before anything is read or written, a JOB or EXPORT_BASE that is not ours.

  Each must lie apart from --data_dir and from the other, and hold only what model.train (or
  model.export) writes there: a folder of the user's own files is never written into.
  """
  check_outputs_apart({'--job_dir': args.job_dir, '--export_base': args.export_base},
                      {'--data_dir': args.data_dir})
  if tf.io.gfile.exists(args.job_dir) and not tf.io.gfile.isdir(args.job_dir):
    raise OutputRefused(f'--job_dir {args.job_dir} is a file, not a folder: give a folder path')
  refuse_unknown_files(args.job_dir, JOB_LAYOUT, '--job_dir')
  export_lib.check_export_base(args.export_base)


def _phases(args: argparse.Namespace, initial_epoch: int) -> list[tuple[int, int, bool]]:
  """The fits still to run, as (initial_epoch, epochs, backbone frozen) for `model.fit`: with
  --frozen_epochs N, epochs 1 to N with the backbone frozen, then the rest fine-tuning it."""
  bounds = [(min(args.frozen_epochs, args.epochs), True), (args.epochs, False)]
  phases, first = [], initial_epoch
  for last, frozen in bounds:
    if first < last:
      phases.append((first, last, frozen))
      first = last
  return phases


def _enter_phase(model: keras.Model, frozen: bool, first: int, args: argparse.Namespace) -> None:
  """Freezes or unfreezes a preset's backbone, recompiling, if the phase wants the other state."""
  backbone = network.find_backbone(model)
  if backbone is None and not frozen:
    return   # nothing to unfreeze (a frozen phase without a backbone is refused below)
  if backbone is not None and backbone.trainable == (not frozen):
    return   # already in the phase's state: a resumed checkpoint keeps its optimizer
  rate = args.learning_rate if frozen else args.fine_tune_learning_rate
  logging.info('epoch %d on: backbone %s, learning rate %g', first + 1,
               'frozen' if frozen else 'fine-tuned', rate)
  set_backbone_frozen(model, frozen, rate)


def _best_epoch(rows: list[dict]) -> int | None:
  losses = [(r['val_loss'], r['epoch']) for r in rows if 'val_loss' in r]
  return min(losses)[1] if losses else None


def train(args: argparse.Namespace) -> dict:
  """Runs the whole job (see the module docstring); returns what JOB/metrics.json holds."""
  check_output_folders(args)
  if args.seed is not None:
    keras.utils.set_random_seed(args.seed)
  data = dataset_lib.load_prepared(args.data_dir, args.image_size)
  # Refuses a used JOB (or a checkpoint of another size) before the read of every shard.
  model, initial_epoch = restore_or_build(args, data.image_size)
  # Held until training ends (or its process dies): a second run into JOB is refused meanwhile.
  with hold_folder(args.job_dir, JOB_LAYOUT, '--job_dir'):
    return _train_held(args, data, model, initial_epoch)


def _train_held(args: argparse.Namespace, data, model: keras.Model, initial_epoch: int) -> dict:
  """`train` once JOB is this run's: verify the shards, fit, evaluate, export."""
  summaries = dataset_lib.verify_shards(data)
  tf.io.gfile.makedirs(checkpoint_dir(args.job_dir))
  job_manifest = os.path.join(args.job_dir, schema.MANIFEST_FILE)
  if tf.io.gfile.exists(job_manifest):   # this job is unfinished again until the end
    tf.io.gfile.remove(job_manifest)

  history = [r for r in read_history(args.job_dir) if r['epoch'] <= initial_epoch]
  steps = dataset_lib.steps_per_epoch(data, 'train', args.batch_size)
  epoch_history = EpochHistory(args.job_dir, history, steps * args.batch_size)
  callbacks = [
      epoch_history,
      keras.callbacks.ModelCheckpoint(
          os.path.join(checkpoint_dir(args.job_dir), CHECKPOINT_PATTERN)),
      EpochSummaries(os.path.join(args.job_dir, 'logs')),
  ]
  train_data = dataset_lib.make_dataset(data, 'train', args.batch_size, training=True,
                                      augment=args.augment, shuffle_buffer=args.shuffle_buffer)
  eval_data = dataset_lib.make_dataset(data, 'eval', args.batch_size, training=False)
  phases = _phases(args, initial_epoch)
  if not phases:
    logging.warning('%d epochs already done (--epochs %d): evaluating and exporting only',
                    initial_epoch, args.epochs)
  for first, last, frozen in phases:
    _enter_phase(model, frozen, first, args)
    # A new early stopping per phase, that knows every epoch before it (kept by EpochHistory).
    stopping = [ResumableEarlyStopping(args.patience, epoch_history.rows)] if args.patience else []
    try:
      model.fit(train_data, validation_data=eval_data, epochs=last, initial_epoch=first,
                callbacks=callbacks + stopping, verbose=fit_verbosity(args.progress),
                steps_per_epoch=steps, shuffle=False)
    except tf.errors.DataLossError:
      # A shard changed after the check above; name it rather than print a byte offset.
      corrupt = dataset_lib.find_corrupt_shard(data)
      if corrupt:
        raise corrupt from None
      raise

  rows = epoch_history.rows
  best = _best_epoch(rows)
  checkpoints = list_checkpoints(args.job_dir)
  if best is not None and best in checkpoints and best != max(checkpoints):
    # Early stopping ends past the best epoch; evaluate and export the best one.
    model.load_weights(checkpoints[best])
  named_eval = dataset_lib.make_dataset(data, 'eval', args.batch_size, training=False,
                                        with_names=True)
  evaluation = evaluate(predict_split(model, named_eval), summaries['train'].label_frequencies())
  thresholds = [evaluation['ground_thresholds'][label] for label in schema.GROUND_LABELS]
  speeds = [r['train_images_per_second'] for r in rows[1:]] or [
      r['train_images_per_second'] for r in rows]
  result = {
      'data_dir': args.data_dir,
      'image_size': data.image_size,
      'architecture': args.architecture,
      'epochs_run': len(rows),
      'best_epoch': best,
      'checkpoint': checkpoints.get(best) if best else None,
      'train': {'examples': summaries['train'].examples,
                'without_weather': summaries['train'].without_weather,
                'label_frequencies': summaries['train'].label_frequencies(),
                # The first epoch also traces the graph; later ones show the steady rate.
                'images_per_second': float(np.median(speeds)) if speeds else None},
      'eval': evaluation,
      'ground_thresholds': thresholds,
      'history': rows,
  }
  metrics_path = os.path.join(args.job_dir, 'metrics.json')
  # Written before the export too, so `python -m model.export --info_json` can redo a failed one.
  manifest_lib.write_json_atomic(metrics_path, result)
  exported = export_lib.export_model(model, args.export_base, export_lib.info_from_metrics(result))
  result['export'] = exported
  manifest_lib.write_json_atomic(metrics_path, result)
  manifest_lib.write_manifest(args.job_dir, {
      'stage': schema.STAGE_TRAIN,
      'inputs': {'data_dir': args.data_dir,
                 'data_manifest_sha256': manifest_lib.sha256_of_file(
                     manifest_lib.manifest_path(args.data_dir))},
      'options': {k: v for k, v in vars(args).items()},
      'counts': {'examples': dict(data.counts), 'epochs_run': len(rows)},
      'outputs': {'metrics': metrics_path, 'checkpoint': result['checkpoint'],
                  'export': exported},
      'eval_mean_f2': evaluation['mean_f2'],
      'eval_mean_f2_honest': evaluation['mean_f2_honest'],
  })
  return result


def main(argv=None):
  # Refused input or configuration (ManifestMissing, CorruptShard, OutputRefused, ...): the message
  # says what to do; a traceback would only hide it.
  command_line.run_command('train', lambda: _train_command(argv),
                           refusals=(FileNotFoundError, FileExistsError, ValueError))


def _train_command(argv):
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  args = parse_args(argv)
  result = train(args)
  print(f'train: {describe_evaluation(result["eval"])}; best epoch {result["best_epoch"]}; '
        f'exported {result["export"]}')


if __name__ == '__main__':
  main()
