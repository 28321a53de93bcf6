"""Version labels end to end: `model.serve --model_config_file`, then `beam_jobs.predict
--model_version_label` over gRPC (ModelSpec.version_label) and REST (`/labels/L`, resolved to a
version first), a label moved mid-job, and the mistakes refused in one line before anything runs.

Two 32 px versions that predict differently are served with `specific { 1, 2 }`; every row must
name the version that answered, which the test checks against each version's in-process rows.
"""
import threading
import time

import numpy as np
import pytest

from beam_jobs import make_sample, predict
from model import schema, serve
from model.serving.faults import Faults
from model.serving.local_server import LocalServingServer
from tests.conftest import make_export_base, read_jsonl
from tests.test_reliability_serving import export_version
from tests.test_user_mistakes import one_line_error

PREDICTIONS = f'{schema.PREDICTIONS_PREFIX}-*.jsonl'
PROTOCOLS = ['grpc', 'rest']


def write_config(path, base_path, labels: dict) -> None:
  """TF Serving's --model_config_file, in its text format."""
  label_text = ''.join(f'\n    version_labels {{ key: "{k}" value: {v} }}'
                       for k, v in labels.items())
  path.write_text(f'''model_config_list {{
  config {{
    name: "{schema.MODEL_NAME}"
    base_path: "{base_path}"
    model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}{label_text}
  }}
}}
''')


@pytest.fixture(scope='module')
def export_base(tmp_path_factory):
  base = make_export_base(tmp_path_factory, 32)
  export_version(base, seed=5)   # version 2: other weights, other probabilities
  return base


@pytest.fixture(scope='module')
def chips(tmp_path_factory):
  out = tmp_path_factory.mktemp('label_chips')
  make_sample.make_sample(str(out), count=24, seed=11, prefix='chip')
  return out / 'train-jpg'


@pytest.fixture(scope='module')
def in_process_rows(tmp_path_factory, export_base, chips) -> dict[str, dict]:
  """{version: {image: its in-process row}}: what each version predicts for each chip."""
  rows = {}
  for version in ('1', '2'):
    out = tmp_path_factory.mktemp(f'in_process_{version}')
    predict.run(['--input', str(chips), '--output_dir', str(out),
                 '--model_dir', str(export_base / schema.MODEL_NAME / version)])
    rows[version] = {r['image_name']: r for r in read_jsonl(out / PREDICTIONS)}
  return rows


@pytest.fixture
def labelled_server(tmp_path, export_base):
  """stable -> 1, canary -> 2, the config file read again every 0.2 s."""
  config = tmp_path / 'models.config'
  write_config(config, export_base / schema.MODEL_NAME, {'stable': 1, 'canary': 2})
  with LocalServingServer(None, rest_api_port=0, model_config_file=str(config),
                          model_config_file_poll_seconds=0.2) as running:
    yield running, config


def job(out, server, chips, protocol, label, *extra) -> dict:
  address = server.address if protocol == 'grpc' else server.rest_address
  return predict.run(['--input', str(chips), '--output_dir', str(out),
                      '--serving_address', address, '--serving_protocol', protocol,
                      '--model_version_label', label, *extra])


def assert_rows_are_the_named_versions(rows, in_process_rows) -> None:
  for row in rows:
    reference = in_process_rows[row['model_version']][row['image_name']]
    for head in ('weather', 'ground'):
      got, want = (np.array(list(r[head].values())) for r in (row, reference))
      assert np.abs(got - want).max() < 1e-5, (row['image_name'], row['model_version'], head)


@pytest.mark.slow
@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_a_labelled_version_is_predicted_through(tmp_path, labelled_server, chips, protocol,
                                                 in_process_rows):
  server, _ = labelled_server
  for label, version in (('stable', '1'), ('canary', '2')):
    summary = job(tmp_path / label, server, chips, protocol, label)
    rows = read_jsonl(tmp_path / label / PREDICTIONS)
    assert summary['counts']['predictions'] == len(rows) == 24
    assert {r['model_version'] for r in rows} == {version}
    assert_rows_are_the_named_versions(rows, in_process_rows)


@pytest.mark.slow
@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_a_label_moved_mid_job_is_followed_and_named(tmp_path, labelled_server, chips, protocol,
                                                    in_process_rows):
  server, config = labelled_server
  # Slow answers keep the job running well past the move (REST asks the label again each second).
  server.set_faults(Faults(latency_secs=0.25))
  requests_before = len(server.predict_request_bytes)

  def move_the_label():
    give_up_at = time.monotonic() + 60
    while len(server.predict_request_bytes) < requests_before + 3:
      assert time.monotonic() < give_up_at
      time.sleep(0.02)
    # As a deployment does it: the config file rewritten, the server reads it at its next poll.
    write_config(config, server.repository.base_path, {'stable': 2, 'canary': 2})
  mover = threading.Thread(target=move_the_label)
  mover.start()
  summary = job(tmp_path / 'moved', server, chips, protocol, 'stable', '--batch_size', '2')
  mover.join()

  rows = read_jsonl(tmp_path / 'moved' / PREDICTIONS)
  assert server.repository.labels == {'stable': 2, 'canary': 2}
  assert summary['counts']['predictions'] == len(rows) == 24
  assert {r['model_version'] for r in rows} == {'1', '2'}   # both answered, each named
  assert_rows_are_the_named_versions(rows, in_process_rows)


@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_an_unknown_label_is_one_line_before_anything_runs(tmp_path, capsys, labelled_server,
                                                           chips, protocol):
  server, _ = labelled_server
  address = server.address if protocol == 'grpc' else server.rest_address
  out = tmp_path / 'out'
  err = one_line_error(capsys, predict.main, [
      '--input', str(chips), '--output_dir', str(out), '--serving_address', address,
      '--serving_protocol', protocol, '--model_version_label', 'nope'])
  assert 'Unrecognized servable version label: nope' in err and 'label nope' in err
  assert not out.exists()


@pytest.mark.parametrize('extra,words', [
    (['--model_version', '1', '--model_version_label', 'stable'],
     '--model_version and --model_version_label both name a version'),
    (['--model_version_label', 'stable'], 'go with --serving_address'),
])
def test_conflicting_version_flags_are_one_line(tmp_path, capsys, chips, extra, words):
  address = [] if extra == ['--model_version_label', 'stable'] else [
      '--serving_address', 'localhost:8500']
  err = one_line_error(capsys, predict.main, [
      '--input', str(chips), '--output_dir', str(tmp_path / 'out'), '--model_dir', 'x',
      *address, *extra], code=2)
  assert words in err


def test_serve_refuses_a_label_on_a_version_it_does_not_serve(tmp_path, capsys, export_base):
  config = tmp_path / 'models.config'
  write_config(config, export_base / schema.MODEL_NAME, {'stable': 7})
  err = one_line_error(capsys, serve.main, ['--model_config_file', str(config), '--port', '0'])
  assert ('Request to assign label to version 7 of model PlanetModel, which is not currently '
          'available for inference') in err


def test_a_config_reload_that_labels_a_missing_version_keeps_the_labels(labelled_server):
  server, config = labelled_server
  write_config(config, server.repository.base_path, {'stable': 9})
  with pytest.raises(ValueError, match='version 9'):
    server.reload_config()
  assert server.repository.labels == {'stable': 1, 'canary': 2}


def test_serve_takes_a_config_file_or_a_base_path(tmp_path, capsys, export_base):
  config = tmp_path / 'models.config'
  write_config(config, export_base / schema.MODEL_NAME, {})
  err = one_line_error(capsys, serve.main, [
      '--model_config_file', str(config), '--model_base_path', str(export_base)], code=2)
  assert 'one of them' in err
