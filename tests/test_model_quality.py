"""Model quality: the honest evaluation, the label rule, test-time augmentation (TTA) and transfer
learning from a keras.applications backbone."""
import json

import keras
import numpy as np
import pytest

from beam_jobs import predict
from beam_jobs.predict.rows import ThresholdsByVersion, result_row
from model import dataset as dataset_lib
from model import evaluation as evaluation_lib
from model import network, schema, train, train_flags, training_model
from model.serving.local_server import LocalServingServer
from tests.conftest import make_export_base, read_jsonl
from tests.conftest_training import prepared_data, write_prepared  # noqa: F401 (fixture)

PREDICTIONS = f'{schema.PREDICTIONS_PREFIX}-*.jsonl'


def _rows(out) -> dict[str, dict]:
  return {r['image_name']: r for r in read_jsonl(out / PREDICTIONS)}


def _assert_same_predictions(rows: dict, expected: dict, tolerance: float = 1e-5) -> None:
  assert rows.keys() == expected.keys() and rows
  for name, row in rows.items():
    for head in ('weather', 'ground'):
      gap = max(abs(row[head][label] - expected[name][head][label]) for label in row[head])
      assert gap < tolerance, (name, head, gap)
    assert row['tags'] == expected[name]['tags'], name


# ----------------------------------------------------------------------------- honest evaluation


def _synthetic_predictions(count: int = 600, seed: int = 0) -> dict[str, np.ndarray]:
  """Named eval predictions whose ground probabilities are noisy around their labels."""
  rng = np.random.default_rng(seed)
  weather_true = np.eye(schema.NUM_WEATHER)[rng.integers(0, schema.NUM_WEATHER, count)]
  ground_true = (rng.random((count, schema.NUM_GROUND)) < 0.3).astype(float)
  return {
      'names': np.array([f'chip_{i}' for i in range(count)]),
      'weather_true': weather_true, 'ground_true': ground_true,
      'weather_probs': np.clip(weather_true * 0.6 + rng.random(weather_true.shape) * 0.3, 0, 1),
      'ground_probs': np.clip(0.4 + 0.2 * ground_true + rng.normal(0, 0.12, ground_true.shape),
                              0, 1),
  }


FREQUENCIES = {label: 0.3 for label in schema.ALL_LABELS}


def test_eval_halves_follow_the_documented_hash():
  assert dataset_lib.eval_half('train_100') == 'tuning'   # sha256 starts 03924fd1...: 0.0140
  assert dataset_lib.eval_half('train_0') == 'test'       # sha256 starts 89e0af20...: 0.5386
  halves = [dataset_lib.eval_half(f'train_{i}') for i in range(4000)]
  assert 0.47 < halves.count('tuning') / len(halves) < 0.53


def test_test_half_labels_never_move_a_threshold_but_change_the_honest_f2():
  predictions = _synthetic_predictions()
  before = evaluation_lib.evaluate(predictions, FREQUENCIES)
  test = np.array([dataset_lib.eval_half(n) == 'test' for n in predictions['names']])
  assert before['halves']['test_examples'] == test.sum() and 250 < test.sum() < 350

  relabelled = {k: v.copy() for k, v in predictions.items()}
  relabelled['ground_true'][test] = 1 - relabelled['ground_true'][test]   # test half only
  after = evaluation_lib.evaluate(relabelled, FREQUENCIES)
  assert after['ground_thresholds'] == before['ground_thresholds']
  assert after['mean_f2'] == before['mean_f2']                    # the tuning half's score
  assert after['mean_f2_honest'] != pytest.approx(before['mean_f2_honest'], abs=0.05)

  # The same change on the tuning half does move thresholds: the test above can fail.
  relabelled = {k: v.copy() for k, v in predictions.items()}
  relabelled['ground_true'][~test] = 1 - relabelled['ground_true'][~test]
  assert (evaluation_lib.evaluate(relabelled, FREQUENCIES)['ground_thresholds']
          != before['ground_thresholds'])
  assert before['mean_f2'] >= before['mean_f2_honest'] - 0.05   # tuned scores are optimistic


def test_the_label_rule_is_reported_with_and_without_on_the_test_half():
  predictions = _synthetic_predictions(seed=1)
  cloudy = predictions['weather_true'][:, 1] == 1
  predictions['ground_true'][cloudy] = 0   # as in the real labels: cloudy comes alone
  result = evaluation_lib.evaluate(predictions, FREQUENCIES)
  assert result['label_rule'] == schema.DEFAULT_LABEL_RULE
  assert result['mean_f2_honest'] > result['mean_f2_honest_without_label_rule'] + 0.01
  described = evaluation_lib.describe_evaluation(result)
  assert described.startswith(f'honest eval F2 {result["mean_f2_honest"]:.4f}')
  assert f'{result["mean_f2_honest_without_label_rule"]:.4f} without' in described


def test_rows_of_every_backend_apply_the_label_rule_and_name_their_signature():
  inference = {schema.OUTPUT_WEATHER: [0.1, 0.7, 0.1, 0.1],
               schema.OUTPUT_GROUND: [0.9] * schema.NUM_GROUND, 'model_version': '3'}
  thresholds = (0.5,) * schema.NUM_GROUND
  ruled = result_row('a', 'a.jpg', inference, ThresholdsByVersion(thresholds), 'PlanetModel')
  assert ruled['tags'] == ['cloudy'] and ruled['signature'] == schema.SERVING_SIGNATURE
  plain = result_row('a', 'a.jpg', inference, ThresholdsByVersion(
      thresholds, label_rule=schema.LABEL_RULE_NONE, signature=schema.TTA_SIGNATURE),
      'PlanetModel')
  assert plain['tags'] == ['cloudy', *schema.GROUND_LABELS]
  assert plain['signature'] == schema.TTA_SIGNATURE


# ----------------------------------------------------------------------------- the tutorial network


def test_tutorial_cnn_pads_like_the_notebook():
  core = network.build_model(128).get_layer(network.CORE_NAME)
  padded = [layer for layer in core.layers
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.MaxPooling2D))]
  assert len(padded) == 4 and all(layer.padding == 'same' for layer in padded)
  flatten = next(layer for layer in core.layers if isinstance(layer, keras.layers.Flatten))
  assert flatten.output.shape[1] == 32 * 32 * 32


# ----------------------------------------------------------------------------- TTA in predict


@pytest.fixture(scope='module')
def tta_chips(tmp_path_factory):
  from beam_jobs.make_sample import make_sample
  out = tmp_path_factory.mktemp('tta_chips')
  make_sample(str(out), count=8, seed=23, prefix='chip')
  return out / 'train-jpg'


@pytest.mark.slow
def test_tta_predicts_alike_in_process_grpc_and_rest_and_is_never_carried_over(
    tmp_path, export_base, tta_chips):
  model_dir = str(export_base / schema.MODEL_NAME)

  def run(out, *extra):
    return predict.run(['--input', str(tta_chips), '--output_dir', str(tmp_path / out),
                        '--model_dir', model_dir, *extra])

  run('plain')
  in_process = run('tta', '--tta', '--label_rule', 'none',
                   '--previous_output', str(tmp_path / 'plain'))
  assert in_process['signature'] == schema.TTA_SIGNATURE and in_process['label_rule'] == 'none'
  # Rows of another signature are predicted again, never reused.
  assert in_process['incremental']['carried'] == 0 and in_process['incremental']['other_model'] == 8
  assert 'signature serving_default' in in_process['incremental']['note']
  manifest = json.loads((tmp_path / 'tta' / schema.MANIFEST_FILE).read_text())
  assert manifest['model']['signature'] == schema.TTA_SIGNATURE
  assert manifest['model']['label_rule'] == 'none'
  tta_rows, plain_rows = _rows(tmp_path / 'tta'), _rows(tmp_path / 'plain')
  assert {r['signature'] for r in tta_rows.values()} == {schema.TTA_SIGNATURE}
  assert {r['signature'] for r in plain_rows.values()} == {schema.SERVING_SIGNATURE}
  assert max(abs(tta_rows[n]['ground'][l] - plain_rows[n]['ground'][l])
             for n in tta_rows for l in schema.GROUND_LABELS) > 1e-4   # TTA changed something

  with LocalServingServer(model_dir, rest_api_port=0) as server:
    for protocol, address in (('grpc', server.address), ('rest', server.rest_address)):
      summary = run(protocol, '--tta', '--label_rule', 'none', '--serving_address', address,
                    '--serving_protocol', protocol)
      assert summary['backend'] == protocol and summary['signature'] == schema.TTA_SIGNATURE
      _assert_same_predictions(_rows(tmp_path / protocol), tta_rows)


def test_an_export_without_the_tta_signature_is_refused_in_one_line(
    tmp_path_factory, tmp_path, capsys, monkeypatch, tta_chips):
  archive_class = type(keras.export.ExportArchive())   # the backend's own subclass
  real_add_endpoint = archive_class.add_endpoint

  def as_before_tta(archive, name, *args, **kwargs):   # the exports made before serving_tta
    if name != schema.TTA_SIGNATURE:
      return real_add_endpoint(archive, name, *args, **kwargs)
    return None

  monkeypatch.setattr(archive_class, 'add_endpoint', as_before_tta)
  older = make_export_base(tmp_path_factory, 32) / schema.MODEL_NAME
  monkeypatch.undo()
  base = ['--input', str(tta_chips), '--output_dir', str(tmp_path / 'out'), '--tta']
  with LocalServingServer(str(older)) as server:
    for backend in (['--model_dir', str(older)], ['--serving_address', server.address]):
      with pytest.raises(SystemExit) as exit_info:
        predict.main(base + backend)
      assert exit_info.value.code == 1
      err = capsys.readouterr().err.strip()
      assert len(err.splitlines()) == 1, err
      assert "no signature 'serving_tta'" in err and 'Re-export it' in err, err
  assert not (tmp_path / 'out').exists()


# ----------------------------------------------------------------------------- transfer learning

PRESET = 'mobilenet_v2'


def _train_args(tmp_path, data_dir, *extra):
  return train_flags.parse_args(['--data_dir', str(data_dir), '--job_dir', str(tmp_path / 'job'),
                                 '--export_base', str(tmp_path / 'export'), '--seed', '0',
                                 '--progress', 'none', *map(str, extra)])


def _backbone_weights(model) -> list[np.ndarray]:
  return network.find_backbone(model).get_weights()


@pytest.mark.slow
def test_backbone_weights_from_a_file_are_the_weights_used(tmp_path):
  keras.utils.set_random_seed(5)
  source = network.build_model(32, network.preset_features(PRESET))
  saved = _backbone_weights(source)
  path = tmp_path / 'backbone.weights.h5'
  network.find_backbone(source).save_weights(str(path))
  # Keras' own downloads (*_no_top.h5) are in the legacy HDF5 layout: loaded the same way.
  from keras.src.legacy.saving import legacy_h5_format   # pylint: disable=import-outside-toplevel
  import h5py   # pylint: disable=import-outside-toplevel
  legacy = tmp_path / 'backbone_no_top.h5'
  with h5py.File(legacy, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, network.find_backbone(source))

  keras.utils.set_random_seed(6)
  fresh, _ = training_model.restore_or_build(
      _train_args(tmp_path, tmp_path, '--architecture', PRESET), 32)
  assert any(not np.array_equal(a, b) for a, b in zip(_backbone_weights(fresh), saved))
  for weights_file in (path, legacy):
    model, _ = training_model.restore_or_build(_train_args(
        tmp_path, tmp_path, '--architecture', PRESET, '--backbone_weights', weights_file), 32)
    used = _backbone_weights(model)
    assert len(used) == len(saved)
    for loaded, expected in zip(used, saved):
      np.testing.assert_array_equal(loaded, expected)

  other = tmp_path / 'tutorial.weights.h5'
  network.build_model(32).save_weights(str(other))
  with pytest.raises(ValueError, match='cannot be loaded into the mobilenet_v2 backbone'):
    training_model.restore_or_build(_train_args(tmp_path, tmp_path, '--architecture', PRESET,
                                                '--backbone_weights', other), 32)
  for wrong in (['--frozen_epochs', 1],                                  # not a preset
                ['--architecture', PRESET, '--backbone_weights', tmp_path / 'missing.h5'],
                ['--architecture', PRESET, '--fine_tune_learning_rate', 1e-4],
                ['--architecture', PRESET, '--frozen_epochs', 11]):   # more than --epochs
    with pytest.raises(SystemExit):
      _train_args(tmp_path, tmp_path, *wrong)


def _tiny_application(include_top, weights, input_shape, pooling, name):
  """A keras.applications stand-in with a batch normalisation, for a fast schedule test."""
  assert not include_top and weights is None and pooling == 'avg'
  inputs = keras.Input(input_shape)
  x = keras.layers.Conv2D(8, 3, activation='relu')(inputs)
  x = keras.layers.BatchNormalization()(x)
  return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name=name)


@pytest.mark.slow
def test_frozen_epochs_train_the_heads_then_fine_tuning_trains_all_across_resume(
    prepared_data, tmp_path, monkeypatch):
  monkeypatch.setitem(network.PRESETS, 'tiny', network.Preset(
      _tiny_application, keras.applications.mobilenet_v2))
  keras.utils.set_random_seed(8)
  weights_file = tmp_path / 'tiny.weights.h5'
  network.find_backbone(network.build_model(32, network.preset_features('tiny'))).save_weights(
      str(weights_file))
  start = network.find_backbone(network.build_model(
      32, network.preset_features('tiny', str(weights_file)))).get_weights()
  common = ['--architecture', 'tiny', '--backbone_weights', weights_file, '--frozen_epochs', 1,
            '--learning_rate', 1e-2, '--patience', 0]

  train.train(_train_args(tmp_path, prepared_data, *common, '--epochs', 2))
  checkpoints = training_model.list_checkpoints(str(tmp_path / 'job'))
  frozen, tuned = (keras.models.load_model(checkpoints[e]) for e in (1, 2))
  assert not network.find_backbone(frozen).trainable and network.find_backbone(tuned).trainable
  for after_frozen_epoch, at_start in zip(_backbone_weights(frozen), start):
    np.testing.assert_array_equal(after_frozen_epoch, at_start)   # moving statistics included
  assert any(not np.array_equal(a, b) for a, b in zip(_backbone_weights(tuned), start))
  assert float(tuned.optimizer.learning_rate) == pytest.approx(1e-3)   # --learning_rate / 10
  steps = int(tuned.optimizer.iterations)   # counted from the recompile: one epoch's steps

  # A resumed fine-tuning run keeps its optimizer; one resumed at the boundary unfreezes.
  train.train(_train_args(tmp_path, prepared_data, *common, '--epochs', 3, '--resume'))
  third = keras.models.load_model(training_model.list_checkpoints(str(tmp_path / 'job'))[3])
  assert int(third.optimizer.iterations) == 2 * steps
  boundary = tmp_path / 'boundary'
  train.train(_train_args(boundary, prepared_data, *common, '--epochs', 1))
  train.train(_train_args(boundary, prepared_data, *common, '--epochs', 2, '--resume'))
  resumed = keras.models.load_model(training_model.list_checkpoints(str(boundary / 'job'))[2])
  assert network.find_backbone(resumed).trainable and int(resumed.optimizer.iterations) == steps
  assert any(not np.array_equal(a, b) for a, b in zip(_backbone_weights(resumed), start))


@pytest.mark.slow
def test_a_preset_trains_exports_and_predicts_alike_in_process_and_through_grpc(tmp_path):
  prepared = write_prepared(tmp_path / 'data', count=12, image_size=128, shards_per_split=1)
  result = train.train(_train_args(tmp_path, prepared, '--architecture', PRESET, '--epochs', 1,
                                   '--batch_size', 8, '--patience', 0))
  assert result['architecture'] == PRESET and len(result['history']) == 1

  model_dir = str(tmp_path / 'export' / schema.MODEL_NAME)
  images = str(tmp_path / 'data' / 'sample' / 'train-jpg')
  args = ['--input', images, '--model_dir', model_dir]
  predict.run(args + ['--output_dir', str(tmp_path / 'in_process')])
  with LocalServingServer(model_dir) as server:
    predict.run(args + ['--output_dir', str(tmp_path / 'grpc'),
                        '--serving_address', server.address])
  in_process = _rows(tmp_path / 'in_process')
  assert len(in_process) == 12
  _assert_same_predictions(_rows(tmp_path / 'grpc'), in_process)
