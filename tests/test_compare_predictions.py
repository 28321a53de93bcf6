"""`python -m beam_jobs.compare_predictions`: what it compares, and what it refuses in one line.

Outputs are written by the test in the prediction job's layout (rows with `rows.row_line`, the
manifest with `manifest.write_manifest`); the exit codes are the real command's, run as a
subprocess.
"""
import json
import os
import subprocess
import sys

import pytest

from beam_jobs import compare_predictions
from beam_jobs.predict import rows as prediction_rows
from model import manifest, schema
from tests.conftest import REPO

SHARD = f'{schema.PREDICTIONS_PREFIX}-00000-of-00001.jsonl'
DEAD_SHARD = f'{schema.DEAD_LETTERS_DIR}/dead_letters-00000-of-00001.jsonl'


def row(name: str, clear: float = 0.7, fingerprint: str | None = None) -> dict:
  """A prediction row as the job writes it (fields of `rows.result_rows`)."""
  weather = dict.fromkeys(schema.WEATHER_LABELS, (1 - clear) / (schema.NUM_WEATHER - 1))
  weather['clear'] = clear
  written = {'image_name': name, 'path': f'/images/{name}.jpg', 'weather': weather,
             'ground': dict.fromkeys(schema.GROUND_LABELS, 0.25), 'tags': ['clear'],
             'model_name': schema.MODEL_NAME, 'model_version': '1',
             'signature': schema.SERVING_SIGNATURE, 'sha256': '0' * 64}
  if fingerprint is not None:
    written['model_fingerprint'] = fingerprint
  return written


def write_output(out, rows: list[dict], dead: tuple[str, ...] = ('bad_0',),
                 stage: str = schema.STAGE_PREDICT, finished: bool = True):
  """OUT/ with one predictions shard, one dead-letter shard and (when finished) its manifest."""
  (out / schema.DEAD_LETTERS_DIR).mkdir(parents=True)
  (out / SHARD).write_text(''.join(prediction_rows.row_line(r) + '\n' for r in rows))
  (out / DEAD_SHARD).write_text(''.join(json.dumps(
      {'image_name': name, 'reason': 'NOT_AN_IMAGE', 'message': 'not an image',
       'stage': schema.STAGE_PREDICT}) + '\n' for name in dead))
  if finished:
    manifest.write_manifest(str(out), {'stage': stage, 'counts': {'predictions': len(rows)}})
  return out


def compare_command(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'beam_jobs.compare_predictions',
                         *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=60,
                        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})


def assert_refused(done: subprocess.CompletedProcess, *parts: str) -> None:
  """Exit 1 and one line on stderr, holding every one of `parts`, no traceback."""
  assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, done.stderr
  assert lines[0].startswith('compare: error: '), lines[0]
  for part in parts:
    assert part in lines[0], (part, lines[0])


@pytest.fixture
def agreeing(tmp_path):
  a = write_output(tmp_path / 'a', [row('chip_0'), row('chip_1')])
  b = write_output(tmp_path / 'b', [row('chip_1'), row('chip_0', clear=0.7 + 1e-7)])
  return a, b


# --- compare_outputs -----------------------------------------------------------------------------

def test_agreeing_outputs_have_no_differences(agreeing):
  differences, counts = compare_predictions.compare_outputs(*map(str, agreeing))
  assert differences == []
  assert counts['predictions'] == 2 and counts['dead_letters'] == 1
  assert 0 < counts['max_difference'] < 1e-6


def test_each_kind_of_difference_is_listed(tmp_path):
  a = write_output(tmp_path / 'a', [row('chip_0'), row('chip_1'), row('only_a')])
  changed = row('chip_1', clear=0.6)
  changed['tags'] = ['haze']
  b = write_output(tmp_path / 'b', [row('chip_0'), changed], dead=('bad_1',))
  differences, _ = compare_predictions.compare_outputs(str(a), str(b))
  assert differences == [
      f'only_a: predicted only in {a}',
      'chip_1: weather probabilities differ by 1.00e-01',
      "chip_1: tags ['clear'] != ['haze']",
      "dead letters differ: [('bad_0', 'NOT_AN_IMAGE'), ('bad_1', 'NOT_AN_IMAGE')]"]


def test_rows_without_fingerprints_on_either_side_are_compared(tmp_path):
  a = write_output(tmp_path / 'a', [row('chip_0', fingerprint='f' * 64)])
  b = write_output(tmp_path / 'b', [row('chip_0')])   # written before rows had fingerprints
  assert compare_predictions.compare_outputs(str(a), str(b))[0] == []
  c = write_output(tmp_path / 'c', [row('chip_0', clear=0.5, fingerprint='f' * 64)])
  assert compare_predictions.compare_outputs(str(a), str(c))[0] == [
      'chip_0: weather probabilities differ by 2.00e-01']


def test_a_row_that_is_not_a_prediction_names_its_line(tmp_path):
  a = write_output(tmp_path / 'a', [row('chip_0')])
  b = write_output(tmp_path / 'b', [row('chip_0')])
  with (b / SHARD).open('a') as f:
    f.write(json.dumps({'image_name': 'chip_1', 'weather': 'sunny'}) + '\n')
  with pytest.raises(compare_predictions.OutputUnusable,
                     match=f'OUT_B: line 2 of {b / SHARD} has no weather probabilities'):
    compare_predictions.compare_outputs(str(a), str(b))


# --- The command ---------------------------------------------------------------------------------

def test_the_command_agrees(agreeing):
  done = compare_command(*agreeing)
  assert done.returncode == 0, done.stderr
  assert 'agree on 2 predictions' in done.stdout and '1 dead letters' in done.stdout


def test_the_command_lists_differences(tmp_path):
  a = write_output(tmp_path / 'a', [row('chip_0')])
  b = write_output(tmp_path / 'b', [row('chip_0', clear=0.9)])
  done = compare_command(a, b)
  assert done.returncode == 1
  assert 'DIFFER in 1 places' in done.stderr and 'chip_0: weather' in done.stderr


@pytest.mark.parametrize('missing_side', ['OUT_A', 'OUT_B'])
def test_a_missing_folder_is_refused(tmp_path, agreeing, missing_side):
  missing = tmp_path / 'never_written'
  args = (missing, agreeing[1]) if missing_side == 'OUT_A' else (agreeing[0], missing)
  assert_refused(compare_command(*args), f'{missing_side}: {missing} does not exist')


def test_an_unfinished_output_is_refused(tmp_path, agreeing):
  unfinished = write_output(tmp_path / 'unfinished', [row('chip_0'), row('chip_1')],
                            finished=False)
  assert_refused(compare_command(agreeing[0], unfinished),
                 'OUT_B: not a finished prediction output', schema.MANIFEST_FILE)


def test_another_stages_output_is_refused(tmp_path, agreeing):
  preprocessed = write_output(tmp_path / 'preprocessed', [row('chip_0')],
                              stage=schema.STAGE_PREPROCESS)
  assert_refused(compare_command(preprocessed, agreeing[1]),
                 "OUT_A: ", "stage 'preprocess', not 'predict'")


def test_an_output_without_prediction_rows_is_refused(tmp_path, agreeing):
  empty = write_output(tmp_path / 'empty', [], dead=('bad_0', 'bad_1'))
  assert_refused(compare_command(agreeing[0], empty), f'OUT_B: {empty} has no prediction rows')


def test_a_truncated_line_is_refused_naming_file_and_line(tmp_path, agreeing):
  truncated = write_output(tmp_path / 'truncated', [row('chip_0'), row('chip_1')])
  text = (truncated / SHARD).read_text()
  (truncated / SHARD).write_text(text[:len(text) - 40])   # cut inside the second line
  assert_refused(compare_command(truncated, agreeing[1]),
                 f'OUT_A: line 2 of {truncated / SHARD} is not JSON')


def test_outputs_of_different_models_are_refused(tmp_path):
  a = write_output(tmp_path / 'a', [row('chip_0', fingerprint='a' * 64),
                                    row('chip_1', fingerprint='a' * 64)])
  b = write_output(tmp_path / 'b', [row('chip_0', fingerprint='b' * 64),
                                    row('chip_1', fingerprint='b' * 64)])
  assert_refused(compare_command(a, b), 'different models (2 images, e.g. chip_0',
                 'aaaaaaaaaaaaaaaaa... in OUT_A')
