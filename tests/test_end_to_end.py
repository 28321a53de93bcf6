"""The whole flow as a user runs it: ./run_local.sh on a small sample, twice; what it prints."""
import json
import os
import subprocess

import pytest

from tests.conftest import REPO
from tests.test_progress import PROGRESS_LINE
from tests.test_quiet_terminal import THIRD_PARTY_LINE


def _run_local(work, **env):
  """The script's whole output, stdout and stderr as a terminal interleaves them."""
  # As a user's shell has it: none of the settings the tests themselves make.
  environment = {name: value for name, value in os.environ.items()
                 if name not in ('PLANET_VERBOSE', 'TF_CPP_MIN_LOG_LEVEL')}
  environment.update({'PLANET_WORK_DIR': str(work), 'PLANET_SAMPLE_COUNT': '240',
                      'PLANET_HOLDOUT_COUNT': '40', 'PLANET_EPOCHS': '1',
                      'PLANET_IMAGE_SIZE': '64', **env})
  done = subprocess.run([str(REPO / 'run_local.sh')], cwd=REPO, env=environment,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stdout[-6000:]
  return done.stdout


@pytest.mark.slow
def test_run_local_runs_the_whole_flow_and_reuses_it(tmp_path):
  first = _run_local(tmp_path)
  for stage in ('1/4 preprocess', '2/4 train + export', '3/4 predict in-process',
                '4/4 predict through gRPC'):
    assert f'== {stage}' in first
  assert 'compare: the two backends agree on 40 predictions' in first
  local = json.loads((tmp_path / 'predict_local' / 'summary.json').read_text())
  grpc = json.loads((tmp_path / 'predict_grpc' / 'summary.json').read_text())
  assert local['counts'] == grpc['counts'] == {
      'images_matched': 40, 'predictions': 40, 'dead_letters': 0}
  assert f'F2 on {tmp_path}/holdout/train-jpg' in first
  # A quiet terminal: nothing from TensorFlow, absl, CUDA or Beam's internals...
  assert [m.group(0) for m in THIRD_PARTY_LINE.finditer(first)] == []
  # ...and each long stage's progress, here (not a terminal) its last line: all of the total.
  progress = [PROGRESS_LINE.match(line) for line in first.splitlines() if line.endswith(' left')]
  assert progress and all(progress)
  finished = {(m['what'], m['done'], m['total'], m['unit'], m['percent'], m['left'])
              for m in progress if m['percent'] == '100'}
  assert finished == {('preprocess', '240', '240', 'CSV rows', '100', '0:00:00'),
                      ('predict', '40', '40', 'images', '100', '0:00:00')}, first
  assert (tmp_path / 'export' / 'PlanetModel' / '1' / 'saved_model.pb').exists()
  assert local['image_size'] == 64

  second = _run_local(tmp_path)
  assert second.count('reusing') == 3
  assert not (tmp_path / 'export' / 'PlanetModel' / '2').exists()
  assert 'compare: the two backends agree on 40 predictions' in second


def test_a_failing_stage_stops_the_script_with_its_message(tmp_path):
  labels = tmp_path / 'labels.csv'
  labels.write_text('name,labels\n')
  (tmp_path / 'images').mkdir()
  environment = {**os.environ, 'PLANET_WORK_DIR': str(tmp_path / 'work'),
                 'PLANET_IMAGES_DIR': str(tmp_path / 'images'), 'PLANET_LABELS_CSV': str(labels)}
  done = subprocess.run([str(REPO / 'run_local.sh')], cwd=REPO, env=environment,
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 1
  assert "stage 'preprocess' failed" in done.stderr
  assert 'image_name,tags' in done.stderr  # the stage's own message says what header it wants
  assert 'Traceback' not in done.stderr
