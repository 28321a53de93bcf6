"""Training: it learns, it resumes where it stopped, and it refuses bad input before training."""
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from model.tf_example import build_example
from beam_jobs.common.labels import LabelRow
from model import export as export_lib
from model import dataset as dataset_lib
from model import schema
from model import network, train, train_flags, training_model
from model.manifest import ManifestMissing
from tests.conftest_training import copy_prepared, prepared_data  # noqa: F401 (fixture)

BATCH = 32


def _args(data_dir, job_dir, export_base, *extra):
  return train_flags.parse_args(['--data_dir', str(data_dir), '--job_dir', str(job_dir),
                                 '--export_base', str(export_base), '--batch_size', str(BATCH),
                                 '--seed', '0', '--progress', 'none', *map(str, extra)])


def pooled_features(inputs):
  """A swapped-in architecture for the test: one conv and a global average pool."""
  x = keras.layers.Conv2D(8, 3, activation='relu', name='swapped_conv')(inputs)
  return keras.layers.GlobalAveragePooling2D()(x)


@pytest.mark.slow
def test_training_learns_beyond_the_prior_only_baseline(prepared_data, tmp_path):
  job, exports = tmp_path / 'job', tmp_path / 'export'
  result = train.train(_args(prepared_data, job, exports, '--epochs', 8, '--patience', 3))

  evaluation = result['eval']
  baseline = evaluation['baseline']
  # The baseline is scored on the same test-half images; on these chips it predicts
  # clear+primary(+agriculture).
  assert {'clear', 'primary'} <= set(baseline['labels'])
  assert 0.5 < baseline['mean_f2'] < 0.75
  # Even at the untuned 0.2 thresholds the model beats the baseline clearly (on the 41 test-half
  # chips, 0.744-0.777 against 0.650 over six runs: tf.data's parallel order varies).
  assert evaluation['mean_f2_default_thresholds'] > baseline['mean_f2'] + 0.06, evaluation
  # Thresholds tuned on the tuning half, scored honestly on the test half: both halves are used.
  halves = evaluation['halves']
  assert halves['tuning_examples'] + halves['test_examples'] == evaluation['examples']
  assert min(halves['tuning_examples'], halves['test_examples']) > evaluation['examples'] // 4
  # 0.759-0.784 over eleven runs, and 0.713 once in CI on a loaded machine (tf.data's parallel
  # order, as above): a margin the tail clears, still well above the baseline's 0.650.
  assert evaluation['mean_f2_honest'] > baseline['mean_f2'] + 0.05
  assert evaluation['label_rule'] == schema.DEFAULT_LABEL_RULE
  assert evaluation['mean_f2_honest_without_label_rule'] is not None

  written = json.loads((job / 'metrics.json').read_text())
  assert written['eval']['mean_f2'] == pytest.approx(evaluation['mean_f2'])
  assert written['eval']['mean_f2_honest'] == pytest.approx(evaluation['mean_f2_honest'])
  assert set(written['eval']['per_label']) == set(schema.ALL_LABELS)
  assert set(written['eval']['per_label']['primary']) >= {'precision', 'recall', 'f2'}
  assert len(written['ground_thresholds']) == schema.NUM_GROUND
  assert written['eval']['weather_confusion']['labels'] == list(schema.WEATHER_LABELS)
  history = written['history']
  assert [r['epoch'] for r in history] == list(range(1, len(history) + 1))
  assert {'loss', 'weather_loss', 'ground_loss', 'val_loss'} <= set(history[0])
  assert history[-1]['loss'] < history[0]['loss']
  assert written['train']['images_per_second'] > 0

  assert sorted(training_model.list_checkpoints(str(job))) == list(range(1, len(history) + 1))
  assert list((job / 'logs' / 'train').glob('events.out.tfevents.*'))
  assert list((job / 'logs' / 'validation').glob('events.out.tfevents.*'))
  job_manifest = json.loads((job / 'manifest.json').read_text())
  assert job_manifest['stage'] == 'train' and job_manifest['outputs']['export'] == result['export']

  planet = json.loads((exports / 'PlanetModel' / '1' / schema.EXPORT_INFO_FILE).read_text())
  assert planet['ground_thresholds'] == written['ground_thresholds']
  assert planet['metrics']['eval_mean_f2'] == pytest.approx(evaluation['mean_f2'])
  assert planet['metrics']['eval_mean_f2_honest'] == pytest.approx(evaluation['mean_f2_honest'])
  assert planet['metrics']['label_rule'] == schema.DEFAULT_LABEL_RULE
  assert job_manifest['eval_mean_f2_honest'] == pytest.approx(evaluation['mean_f2_honest'])
  assert planet['image_size'] == written['image_size']


@pytest.mark.slow
def test_resume_continues_at_the_next_epoch_with_the_optimizer_state(prepared_data, tmp_path):
  job, exports = tmp_path / 'job', tmp_path / 'export'
  train.train(_args(prepared_data, job, exports, '--epochs', 2, '--patience', 0))
  steps = math.ceil(dataset_lib.load_prepared(str(prepared_data)).counts['train'] / BATCH)
  saved = keras.models.load_model(training_model.list_checkpoints(str(job))[2])
  assert int(saved.optimizer.iterations.numpy()) == 2 * steps

  # A second run into the same folder without --resume would mix two runs: refused.
  with pytest.raises(FileExistsError, match='pass --resume'):
    train.train(_args(prepared_data, job, exports, '--epochs', 3))

  resume_args = _args(prepared_data, job, exports, '--epochs', 3, '--patience', 0, '--resume')
  model, initial_epoch = training_model.restore_or_build(resume_args, 32)
  assert initial_epoch == 2
  assert int(model.optimizer.iterations.numpy()) == 2 * steps
  for restored, expected in zip(model.get_weights(), saved.get_weights()):
    np.testing.assert_array_equal(restored, expected)
  adam_state = [v.numpy() for v in model.optimizer.variables]
  for restored, expected in zip(adam_state, [v.numpy() for v in saved.optimizer.variables]):
    np.testing.assert_array_equal(restored, expected)
  assert any(np.abs(v).sum() > 0 for v in adam_state[2:])   # real moments, not a fresh optimizer

  result = train.train(resume_args)
  assert [r['epoch'] for r in result['history']] == [1, 2, 3]   # one more epoch, history kept
  assert sorted(training_model.list_checkpoints(str(job))) == [1, 2, 3]
  third = keras.models.load_model(training_model.list_checkpoints(str(job))[3])
  assert int(third.optimizer.iterations.numpy()) == 3 * steps   # counted on, not restarted
  assert export_lib.list_versions(str(exports / 'PlanetModel')) == [1, 2]


def test_the_architecture_is_one_swappable_function(prepared_data, tmp_path):
  args = _args(prepared_data, tmp_path / 'job', tmp_path / 'export',
               '--architecture', f'{__name__}:pooled_features')
  model, initial_epoch = training_model.restore_or_build(args, 32)
  assert initial_epoch == 0
  core = model.get_layer('planet_core')
  assert core.get_layer('swapped_conv') is not None
  assert model.input.dtype == 'uint8' and set(model.output) == set(schema.OUTPUT_NAMES)
  with pytest.raises(SystemExit):
    _args(prepared_data, tmp_path / 'job', tmp_path / 'export', '--architecture', 'model.network:nothing')


def test_data_without_a_manifest_is_refused(prepared_data, tmp_path, capsys):
  data_dir = copy_prepared(prepared_data, tmp_path / 'prep')
  (data_dir / schema.MANIFEST_FILE).unlink()
  args = ['--data_dir', str(data_dir), '--job_dir', str(tmp_path / 'job'),
          '--export_base', str(tmp_path / 'export')]
  with pytest.raises(ManifestMissing, match='has no manifest.json: the stage that writes it did not finish'):
    train.train(train_flags.parse_args(args))
  with pytest.raises(SystemExit) as exit_info:  # the command: a message, not a traceback
    train.main(args)
  assert exit_info.value.code == 1
  assert 'train: error:' in capsys.readouterr().err
  assert not (tmp_path / 'job').exists() and not (tmp_path / 'export').exists()


def test_data_of_another_image_size_is_refused(prepared_data, tmp_path):
  with pytest.raises(ValueError, match='pixels but --image_size is 64'):
    train.train(_args(prepared_data, tmp_path / 'job', tmp_path / 'export', '--image_size', 64))


def test_a_truncated_shard_stops_training_before_it_starts_naming_the_file(prepared_data, tmp_path):
  data_dir = copy_prepared(prepared_data, tmp_path / 'prep')
  shard = sorted(data_dir.glob('train-*'))[1]
  shard.write_bytes(shard.read_bytes()[:-1000])
  with pytest.raises(dataset_lib.CorruptShard, match=str(shard)):
    train.train(_args(data_dir, tmp_path / 'job', tmp_path / 'export'))
  assert not training_model.list_checkpoints(str(tmp_path / 'job'))


def test_a_shard_damaged_after_the_check_is_still_named(prepared_data, tmp_path, monkeypatch):
  data_dir = copy_prepared(prepared_data, tmp_path / 'prep')
  intact = dataset_lib.verify_shards(dataset_lib.load_prepared(str(data_dir)))
  shard = sorted(data_dir.glob('train-*'))[0]
  shard.write_bytes(shard.read_bytes()[:-1000])
  real_verify, calls = dataset_lib.verify_shards, []

  def verify_before_the_damage(data, *args, **kwargs):
    calls.append(1)
    return intact if len(calls) == 1 else real_verify(data, *args, **kwargs)

  monkeypatch.setattr(dataset_lib, 'verify_shards', verify_before_the_damage)
  with pytest.raises(dataset_lib.CorruptShard, match=str(shard)):
    train.train(_args(data_dir, tmp_path / 'job', tmp_path / 'export', '--epochs', 1))
  assert len(calls) == 2   # the read error mid-epoch sent the trainer looking for the file


def test_rows_without_weather_add_no_weather_loss():
  model = training_model.compile_model(network.build_model(16), 1e-2)
  images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  ground = np.zeros((6, schema.NUM_GROUND), np.float32)
  ground[:, 8] = 1
  no_weather = np.zeros((6, schema.NUM_WEATHER), np.float32)
  serialized = []
  for i in range(6):
    serialized.append(build_example(LabelRow(f'r{i}', tuple(no_weather[i]), tuple(ground[i])),
                                    images[i], 'ab' * 32))
  batch = tf.data.Dataset.from_tensors(dataset_lib.parse_batch(tf.constant(serialized), 16))
  losses = model.evaluate(batch, verbose=0, return_dict=True)
  assert losses['weather_loss'] == 0.0 and losses['ground_loss'] > 0
  head = model.get_layer('planet_core').get_layer(schema.OUTPUT_WEATHER)
  before = [w.copy() for w in head.get_weights()]
  model.fit(batch, epochs=3, verbose=0, shuffle=False)
  for after, expected in zip(head.get_weights(), before):
    np.testing.assert_array_equal(after, expected)   # no gradient ever reached the weather head
