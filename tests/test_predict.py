"""The prediction job, in-process backend: conservation, exact predictions, F2, refusals, Dataflow."""
import json
import shutil

import numpy as np
import pytest

from beam_jobs import predict
from beam_jobs.common.image_decoder import decode_image
from beam_jobs.predict.pipeline import write_text_file
from model import metrics, schema
from tests.conftest import DATAFLOW_DRY_RUN_ARGS, REPO
from tests.conftest import PREDICT_IMAGE_SIZE as IMAGE_SIZE, read_jsonl as _read_jsonl

PREDICTIONS = f'{schema.PREDICTIONS_PREFIX}-*.jsonl'
DEAD_LETTERS = f'{schema.DEAD_LETTERS_DIR}/*.jsonl'


def test_every_image_is_a_prediction_or_a_dead_letter(predict_job):
  out, summary = predict_job
  predictions = _read_jsonl(f'{out}/{PREDICTIONS}')
  dead = _read_jsonl(f'{out}/{DEAD_LETTERS}')
  # 24 chips + 1 duplicate + 6 real + 4 refused inputs; readme.txt is not an image.
  assert summary['counts'] == {'images_matched': 35, 'predictions': 30, 'dead_letters': 5}
  assert len(predictions) == 30 and len(dead) == 5
  names = [p['image_name'] for p in predictions]
  assert len(set(names)) == 30
  assert {d['reason'] for d in dead} == {
      'EMPTY_FILE', 'NOT_AN_IMAGE', 'TRUNCATED_IMAGE', 'TOO_MANY_PIXELS', 'DUPLICATE_NAME'}
  assert summary['dead_letter_reasons'] == {r: 1 for r in {d['reason'] for d in dead}}
  duplicate = next(d for d in dead if d['reason'] == 'DUPLICATE_NAME')
  assert duplicate['image_name'] == 'chip_2' and 'chip_2' in names
  assert all(d['message'] and d['stage'] == 'predict' and d['path'] for d in dead)
  manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
  assert manifest['counts']['predictions'] == 30 and manifest['model']['version'] == '1'


def _assert_equal_to_the_saved_model(predictions: dict, export_base) -> np.ndarray:
  """The job's predictions are the SavedModel's on the one decoder's pixels; returns the pixels."""
  import tensorflow as tf
  paths = [predictions[n]['path'] for n in sorted(predictions)]
  pixels = np.stack([decode_image(open(p, 'rb').read(), IMAGE_SIZE) for p in paths])
  loaded = tf.saved_model.load(str(export_base / 'PlanetModel' / '1'))
  direct = loaded.signatures[schema.SERVING_SIGNATURE](images=tf.constant(pixels))
  job_weather = np.array([[predictions[n]['weather'][l] for l in schema.WEATHER_LABELS]
                          for n in sorted(predictions)])
  job_ground = np.array([[predictions[n]['ground'][l] for l in schema.GROUND_LABELS]
                         for n in sorted(predictions)])
  assert np.abs(job_weather - direct['weather'].numpy()).max() < 1e-6
  assert np.abs(job_ground - direct['ground'].numpy()).max() < 1e-6
  return pixels


def test_predictions_equal_the_saved_model_on_the_decoders_pixels(predict_job, export_base):
  out, _ = predict_job
  predictions = {p['image_name']: p for p in _read_jsonl(f'{out}/{PREDICTIONS}')}
  _assert_equal_to_the_saved_model(predictions, export_base)
  for name in ('train_0', 'train_10000'):  # the markerless CMYK chips were predicted, not refused
    assert name in predictions and predictions[name]['model_version'] == '1'


def test_planet_chips_are_predicted_from_their_colours(tmp_path, planet_dir, export_base):
  # Markerless CMYK JPEGs, generated and (where present) real: TensorFlow would see black.
  summary = predict.run(['--input', str(planet_dir / 'train-jpg'), '--output_dir',
                         str(tmp_path / 'out'), '--model_dir', str(export_base / 'PlanetModel'),
                         '--labels_csv', str(planet_dir / 'train_v2.csv')])
  assert summary['counts'] == {'images_matched': 6, 'predictions': 6, 'dead_letters': 0}
  assert summary['evaluation']['labelled_images'] == 6
  predictions = {p['image_name']: p for p in _read_jsonl(f'{tmp_path}/out/{PREDICTIONS}')}
  pixels = _assert_equal_to_the_saved_model(predictions, export_base)
  assert pixels.reshape(6, -1).mean(axis=1).min() > 20, 'a chip was predicted from black pixels'


def test_summary_f2_equals_an_independent_computation(predict_job, mixed_folder):
  out, summary = predict_job
  _, labels_csv = mixed_folder
  truth = {}
  for line in labels_csv.read_text().splitlines()[1:]:
    name, tags = line.split(',')
    truth[name] = set(tags.split())
  lines = (out / schema.SUBMISSION_FILE).read_text().splitlines()
  assert lines[0] == 'image_name,tags' and len(lines) == 31
  submitted = {l.split(',')[0]: set(l.split(',')[1].split()) for l in lines[1:]}
  y_true = np.array([[label in truth[n] for label in schema.ALL_LABELS] for n in submitted])
  y_pred = np.array([[label in submitted[n] for label in schema.ALL_LABELS] for n in submitted])
  assert summary['evaluation']['labelled_images'] == 30
  assert summary['evaluation']['f2'] == pytest.approx(metrics.mean_f2(y_true, y_pred), abs=1e-9)
  assert sum(map(sum, summary['evaluation']['weather_confusion'])) == 30


def test_report_is_written(predict_job):
  out, _ = predict_job
  html = (out / schema.REPORT_FILE).read_text()
  assert html.lstrip().lower().startswith('<!doctype html') and 'chip_' in html


def _run_expecting(capsys, argv, *fragments):
  with pytest.raises(SystemExit):
    predict.main(argv)
  err = capsys.readouterr().err
  for fragment in fragments:
    assert fragment in err, err


def test_refusals_before_the_pipeline_starts(tmp_path, capsys, export_base, mixed_folder):
  images, _ = mixed_folder
  model = str(export_base / 'PlanetModel')
  out = str(tmp_path / 'out')
  _run_expecting(capsys, ['--input', str(tmp_path / 'nothing'), '--output_dir', out,
                          '--model_dir', model], 'matches no .jpg')
  (tmp_path / 'no_model').mkdir()
  _run_expecting(capsys, ['--input', str(images), '--output_dir', out,
                          '--model_dir', str(tmp_path / 'no_model')], 'no complete model version')
  bad_csv = tmp_path / 'bad.csv'
  bad_csv.write_text('name,labels\n')
  _run_expecting(capsys, ['--input', str(images), '--output_dir', out, '--model_dir', model,
                          '--labels_csv', str(bad_csv)], 'unrecognised labels CSV header')
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'old.txt').write_text('x')
  # A file the job did not write is never called ours, and --overwrite is no way past it.
  for overwrite in ([], ['--overwrite']):
    _run_expecting(capsys, ['--input', str(images), '--output_dir', out, '--model_dir', model,
                            *overwrite], "holds 1 file that predict did not write ('old.txt')")
  assert (tmp_path / 'out' / 'old.txt').read_text() == 'x'


def test_refuses_an_export_without_the_serving_signature(tmp_path, capsys, export_base, mixed_folder):
  images, _ = mixed_folder
  broken = tmp_path / 'PlanetModel' / '1'
  shutil.copytree(export_base / 'PlanetModel' / '1', broken)
  pb = (broken / 'saved_model.pb').read_bytes()
  (broken / 'saved_model.pb').write_bytes(pb.replace(b'serving_default', b'serving_other__'))
  _run_expecting(capsys, ['--input', str(images), '--output_dir', str(tmp_path / 'out'),
                          '--model_dir', str(broken.parent)], 'does not match its checksum')


def test_too_many_bad_images_fail_the_job_without_a_manifest(tmp_path, capsys, export_base,
                                                             mixed_folder):
  images, _ = mixed_folder
  out = tmp_path / 'out'
  _run_expecting(capsys, ['--input', str(images), '--output_dir', str(out),
                          '--model_dir', str(export_base / 'PlanetModel'),
                          '--max_bad_fraction', '0.05'],
                 '5 of 35 images', f'{out}/{schema.DEAD_LETTERS_DIR}')
  assert not (out / schema.MANIFEST_FILE).exists()


@pytest.mark.slow
def test_dataflow_dry_run_translates_the_job(monkeypatch, export_base, mixed_folder):
  monkeypatch.chdir(REPO)   # --setup_file=./setup.py, as a user runs it
  images, labels_csv = mixed_folder
  summary = predict.run([
      '--input', str(images), '--output_dir', 'gs://my-bucket/out',
      '--model_dir', str(export_base / 'PlanetModel'), '--labels_csv', str(labels_csv),
      *DATAFLOW_DRY_RUN_ARGS])
  assert summary['dry_run']
  # SpreadReads: Dataflow rebalances the reads; the local runner runs without that shuffle.
  for step in ('ListImages', 'SpreadReads', 'ReadAndDecode', 'RunInference', 'WritePredictions',
               'WriteDeadLetters', 'WriteSubmission', 'WriteSummary', 'WriteReport', 'AttachTruth'):
    assert step in summary['transforms'], step


@pytest.mark.slow
def test_multi_processing_gives_the_same_outputs(tmp_path, predict_job, export_base, mixed_folder):
  images, labels_csv = mixed_folder
  out, summary = predict_job
  multi = predict.run(['--input', str(images), '--output_dir', str(tmp_path / 'multi'),
                       '--model_dir', str(export_base / 'PlanetModel'),
                       '--labels_csv', str(labels_csv), '--max_bad_fraction', '0.3',
                       '--direct_running_mode=multi_processing', '--direct_num_workers=2'])
  assert multi['counts'] == summary['counts']
  # Summation order differs between workers: equal to rounding.
  assert multi['evaluation']['f2'] == pytest.approx(summary['evaluation']['f2'], abs=1e-12)

  def keyed(pattern):
    return {r['image_name'] + r.get('reason', ''): r for r in _read_jsonl(pattern)}
  multi_rows, rows = keyed(f'{tmp_path}/multi/{PREDICTIONS}'), keyed(f'{out}/{PREDICTIONS}')
  assert multi_rows.keys() == rows.keys()
  for name, row in rows.items():
    other = multi_rows[name]
    # Batches are formed differently across workers, and oneDNN's float sums with them.
    for head in ('weather', 'ground'):
      assert np.abs(np.array(list(row[head].values())) -
                    np.array(list(other[head].values()))).max() < 1e-6
    assert {k: v for k, v in row.items() if k not in ('weather', 'ground', 'path')} == {
        k: v for k, v in other.items() if k not in ('weather', 'ground', 'path')}
  dead = {k: {f: v for f, v in r.items()} for k, r in keyed(f'{out}/{DEAD_LETTERS}').items()}
  assert keyed(f'{tmp_path}/multi/{DEAD_LETTERS}') == dead
  assert ((tmp_path / 'multi' / schema.SUBMISSION_FILE).read_text()
          == (out / schema.SUBMISSION_FILE).read_text())


def test_a_one_element_output_is_its_string_and_a_newline_written_again_the_same(tmp_path):
  path = str(tmp_path / schema.SUMMARY_FILE)
  for _ in range(2):   # a retried bundle writes the file again, whole
    write_text_file('{"a": "\u00e9"}', path, 'application/json')
    assert (tmp_path / schema.SUMMARY_FILE).read_bytes() == '{"a": "\u00e9"}\n'.encode('utf-8')
