"""The prediction job through TF Serving's gRPC API: parity with in-process, faults, dry run."""
import json
import shutil

import numpy as np
import pytest

from beam_jobs import compare_predictions, predict
from model import schema
from model.serving.faults import Faults
from model.serving.local_server import LocalServingServer
from tests.conftest import DATAFLOW_DRY_RUN_ARGS, REPO, read_jsonl

PREDICTIONS = f'{schema.PREDICTIONS_PREFIX}-*.jsonl'


def _grpc_job(out, server, export_base, mixed_folder, *extra):
  images, labels_csv = mixed_folder
  return predict.run(['--input', str(images), '--output_dir', str(out),
                      '--serving_address', server.address,
                      '--model_dir', str(export_base / 'PlanetModel'),
                      '--labels_csv', str(labels_csv), '--max_bad_fraction', '0.3', *extra])


def _by_name(pattern):
  return {r['image_name']: r for r in read_jsonl(pattern)}


def test_grpc_backend_equals_in_process(tmp_path, server, export_base, mixed_folder, predict_job):
  in_process_out, in_process = predict_job
  summary = _grpc_job(tmp_path / 'grpc', server, export_base, mixed_folder)
  assert summary['backend'] == 'grpc' and summary['counts'] == in_process['counts']
  grpc_rows = _by_name(tmp_path / 'grpc' / PREDICTIONS)
  rows = _by_name(in_process_out / PREDICTIONS)
  assert grpc_rows.keys() == rows.keys() and len(rows) == 30
  for name, row in rows.items():
    for head in ('weather', 'ground'):
      difference = np.abs(np.array(list(row[head].values()))
                          - np.array(list(grpc_rows[name][head].values())))
      assert difference.max() < 1e-5, (name, head)
    assert grpc_rows[name]['tags'] == row['tags']
    assert grpc_rows[name]['model_version'] == '1'

  def dead(out):
    return sorted((d['image_name'], d['reason'], d['message']) for d in read_jsonl(
        out / schema.DEAD_LETTERS_DIR / '*.jsonl'))
  assert dead(tmp_path / 'grpc') == dead(in_process_out)
  assert summary['evaluation']['f2'] == pytest.approx(in_process['evaluation']['f2'], abs=1e-9)
  # The check run_local.sh prints agrees, and sees a difference when there is one.
  assert compare_predictions.compare_outputs(str(tmp_path / 'grpc'), str(in_process_out))[0] == []
  tampered = tmp_path / 'tampered'
  shutil.copytree(tmp_path / 'grpc', tampered)
  shard = next(tampered.glob(PREDICTIONS))
  lines = shard.read_text().splitlines()
  row = json.loads(lines[0])
  row['weather']['clear'] += 1e-3
  shard.write_text('\n'.join([json.dumps(row)] + lines[2:]) + '\n')
  differences, _ = compare_predictions.compare_outputs(str(tampered), str(in_process_out))
  assert len(differences) == 2 and 'weather probabilities differ' in differences[-1]


def test_grpc_job_survives_30_percent_unavailable(tmp_path, export_base, mixed_folder):
  with LocalServingServer(str(export_base / 'PlanetModel')) as flaky:
    flaky.set_faults(Faults(failure_fraction=0.3, seed=3))
    summary = _grpc_job(tmp_path / 'flaky', flaky, export_base, mixed_folder, '--batch_size', '4')
  assert summary['counts'] == {'images_matched': 35, 'predictions': 30, 'dead_letters': 5}
  assert 'UNAVAILABLE' not in summary['dead_letter_reasons']
  names = [r['image_name'] for r in read_jsonl(tmp_path / 'flaky' / PREDICTIONS)]
  assert len(names) == len(set(names)) == 30


def test_wrong_model_name_or_size_fails_before_the_pipeline(tmp_path, capsys, server, export_base,
                                                          mixed_folder):
  images, _ = mixed_folder
  base = ['--input', str(images), '--output_dir', str(tmp_path / 'out'),
          '--serving_address', server.address]
  with pytest.raises(SystemExit):
    predict.main(base + ['--model_name', 'OtherModel'])
  assert 'OtherModel' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    predict.main(base + ['--model_version', '7'])
  assert '7' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_dataflow_dry_run_translates_the_grpc_job(monkeypatch, server, export_base, mixed_folder):
  monkeypatch.chdir(REPO)   # --setup_file=./setup.py, as a user runs it
  images, _ = mixed_folder
  translated = predict.run([
      '--input', str(images), '--output_dir', 'gs://my-bucket/out',
      '--serving_address', server.address, '--model_dir', str(export_base / 'PlanetModel'),
      *DATAFLOW_DRY_RUN_ARGS])
  assert translated['dry_run'] and 'RunInference' in translated['transforms']
