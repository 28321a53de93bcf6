"""Reliability at volume: gRPC faults and a restart, a new model version mid-job, peak memory.

Each test is a row of RELIABILITY.md (scenario, expected behaviour, measured figure); the figures
each test measures are printed (`pytest -s`) so the table can be checked against a run.
To stay fast on two shared cores the images are 32 px (the model's resolution) and the thousands
of inputs are hard links to 50 distinct generated chips under distinct names: the jobs key,
count and write every name on its own, which is what these tests are about.
"""
import collections
import json
import os
import subprocess
import sys
import threading
import time

import apache_beam as beam
import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf

from beam_jobs.common import progress
from beam_jobs import make_sample, predict
from beam_jobs.predict.backends import tf_serving as serving_handler
from beam_jobs.common.image_decoder import decode_image
from model import schema
from model.export import export_model
from model.network import build_model
from model.serving.faults import FaultInjector, Faults
from model.serving.local_server import LocalServingServer
from model.serving.refusal import Refusal
from tests.conftest import REPO, read_jsonl, restarted_mid_job

IMAGE_SIZE = 32
DISTINCT_CHIPS = 50


# ----------------------------------------------------------------------------- data and helpers


@pytest.fixture(scope='module')
def chips(tmp_path_factory):
  """50 distinct generated chips: (folder of <name>.jpg, {name: tags})."""
  out = tmp_path_factory.mktemp('chips')
  rows = make_sample.make_sample(str(out), count=DISTINCT_CHIPS, seed=23, prefix='chip')
  return out / 'train-jpg', dict(rows)


def link_copies(chips, folder, count: int) -> dict[str, str]:
  """`count` images in `folder`, image i a hard link to distinct chip i % 50: {name: chip name}."""
  chips_dir, tags = chips
  folder.mkdir(parents=True, exist_ok=True)
  sources = sorted(tags)
  copies = {}
  for i in range(count):
    source = sources[i % len(sources)]
    name = f'img_{i:05d}'
    target = folder / f'{name}.jpg'
    try:
      os.link(chips_dir / f'{source}.jpg', target)
    except OSError:   # another file system: copy
      target.write_bytes((chips_dir / f'{source}.jpg').read_bytes())
    copies[name] = source
  return copies


def export_version(export_base, seed: int,
                   ground_threshold: float = schema.DEFAULT_GROUND_THRESHOLD, model=None) -> str:
  """Exports a 32 px model (weights drawn from `seed`) as the next version; returns its folder."""
  if model is None:
    keras.utils.set_random_seed(seed)
    model = build_model(IMAGE_SIZE)
  return export_model(model, str(export_base),
                      {'ground_thresholds': [ground_threshold] * schema.NUM_GROUND})


@pytest.fixture(scope='module')
def export_base(tmp_path_factory):
  base = tmp_path_factory.mktemp('export32')
  export_version(base, seed=1)
  return base


@pytest.fixture
def pipeline_results(monkeypatch):
  """The result of every pipeline run in this process, so a test can read the job's counters."""
  results = []
  original_run = beam.Pipeline.run

  def run_and_keep(self, *args, **kwargs):
    result = original_run(self, *args, **kwargs)
    results.append(result)
    return result
  monkeypatch.setattr(beam.Pipeline, 'run', run_and_keep)
  return results


@pytest.fixture
def attempts_per_request(monkeypatch):
  """(images in the request, attempts it took) for every request the gRPC handler sent."""
  log = []
  lock = threading.Lock()
  original_call = serving_handler.ServingGrpcHandler._call  # pylint: disable=protected-access

  def counted_call(self, client, request, tally):
    before = tally.requests
    images = request.inputs[schema.INPUT_IMAGES].tensor_shape.dim[0].size
    try:
      return original_call(self, client, request, tally)
    finally:
      with lock:
        log.append((images, tally.requests - before))
  monkeypatch.setattr(serving_handler.ServingGrpcHandler, '_call', counted_call)
  return log


class MixedFaults(FaultInjector):
  """The server's fault hook, drawing per call: a transient refusal, a stall past the deadline, OK.

  `Faults` gives one failure code and a fixed latency for every call; production fails in a
  mix, so each Predict call draws: `failure_fraction` of them are refused UNAVAILABLE or
  RESOURCE_EXHAUSTED (half each), `slow_fraction` are held `slow_secs` (past the client's
  deadline: it sees DEADLINE_EXCEEDED while the server still works), the rest are answered.
  """

  def __init__(self, failure_fraction: float, slow_fraction: float, slow_secs: float, seed: int):
    super().__init__(Faults(seed=seed))
    self._failure_fraction = failure_fraction
    self._slow_fraction = slow_fraction
    self._slow_secs = slow_secs
    self.outcomes = collections.Counter()

  def before_call(self) -> None:
    with self._lock:
      draw = self._random.random()
      outcome = ('UNAVAILABLE' if draw < self._failure_fraction / 2 else
                 'RESOURCE_EXHAUSTED' if draw < self._failure_fraction else
                 'slow' if draw < self._failure_fraction + self._slow_fraction else 'answered')
      self.outcomes[outcome] += 1
    if outcome == 'slow':
      time.sleep(self._slow_secs)
    elif outcome != 'answered':
      raise Refusal(grpc.StatusCode[outcome],
                    f'injected fault: the server is pretending to be {outcome.lower()}')


def max_attempts_within(budget_secs: float, initial_secs: float = 0.25,
                        max_secs: float = 4.0) -> int:
  """The most attempts the handler can make for one request: its shortest backoffs fill the budget.

  Every delay is jittered down by at most half, and a request is retried only while the next
  delay ends within `budget_secs` of its first failure.
  """
  attempts, spent, delay = 1, 0.0, initial_secs
  while spent + delay / 2 <= budget_secs:
    spent += delay / 2
    attempts += 1
    delay = min(max_secs, delay * 2)
  return attempts


# ----------------------------------------------------------------------------- 1. faults at volume


FAULT_IMAGES = 5000
REQUEST_TIMEOUT_SECS = 0.5
RETRY_BUDGET_SECS = 20.0


@pytest.mark.slow
def test_5000_images_through_faults_and_a_restart(tmp_path, chips, export_base, pipeline_results,
                                                  attempts_per_request):
  """30% transient refusals, 5% stalls past the deadline and one restart: every image once."""
  copies = link_copies(chips, tmp_path / 'images', FAULT_IMAGES)
  server = LocalServingServer(str(export_base / schema.MODEL_NAME))
  faults = MixedFaults(failure_fraction=0.3, slow_fraction=0.05,
                       slow_secs=2 * REQUEST_TIMEOUT_SECS, seed=9)
  server._faults = faults  # pylint: disable=protected-access  # before start: its services take it
  server.start()
  started = time.monotonic()
  try:
    # A fifth of the way in: about 270 calls reach the server in all.
    with restarted_mid_job(server, lambda: len(server.predict_request_bytes), 60) as restart:
      summary = predict.run([
          '--input', str(tmp_path / 'images'), '--output_dir', str(tmp_path / 'out'),
          '--serving_address', server.address, '--model_dir', str(export_base / schema.MODEL_NAME),
          '--request_timeout_secs', str(REQUEST_TIMEOUT_SECS),
          '--retry_budget_secs', str(RETRY_BUDGET_SECS), '--batch_size', '128'])
  finally:
    server.stop()
  elapsed = time.monotonic() - started

  # The restart happened mid-job, and the job went on against the restarted server.
  assert 'restarted_at' in restart, restart.get('error', 'the job ended before the restart')
  assert len(server.predict_request_bytes) > restart['calls_before']
  assert faults.outcomes['slow'] > 0 and faults.outcomes['UNAVAILABLE'] > 0
  assert faults.outcomes['RESOURCE_EXHAUSTED'] > 0

  # Every image exactly once: predicted, or dead-lettered with a reason; the counts add up.
  rows = read_jsonl(tmp_path / 'out' / 'predictions-*.jsonl')
  dead = read_jsonl(tmp_path / 'out' / schema.DEAD_LETTERS_DIR / '*.jsonl')
  predicted = [r['image_name'] for r in rows]
  refused = [d['image_name'] for d in dead]
  assert len(predicted) == len(set(predicted)) and len(refused) == len(set(refused))
  assert set(predicted) | set(refused) == set(copies) and not set(predicted) & set(refused)
  assert all(d['reason'] and d['message'] for d in dead)
  counts = summary['counts']
  assert counts == {'images_matched': FAULT_IMAGES, 'predictions': len(rows),
                    'dead_letters': len(dead)}
  # A 20 s budget rides out a 1.5 s restart and 35% faults: nothing is lost.
  assert counts['dead_letters'] == 0, summary['dead_letter_reasons']

  # Retries stay bounded, and the handler's counters agree with what was sent.
  counters = progress.query_counters(pipeline_results[-1])
  sent = sum(images for images, _ in attempts_per_request)
  attempts = np.repeat([a for _, a in attempts_per_request], [i for i, _ in attempts_per_request])
  assert sent == FAULT_IMAGES
  assert counters['grpc_requests'] == sum(a for _, a in attempts_per_request)
  assert counters['grpc_retries'] == counters['grpc_requests'] - len(attempts_per_request)
  assert counters['grpc_predicted_images'] == FAULT_IMAGES
  # Each attempt fails with p = 0.35 (more during the restart): about 1 / 0.65 = 1.5 attempts.
  assert attempts.mean() < 2.2
  assert attempts.max() <= max_attempts_within(RETRY_BUDGET_SECS)
  # The server saw every attempt but those made while it was down.
  assert len(server.predict_request_bytes) <= counters['grpc_requests']
  print(f'\nfaults at volume: {FAULT_IMAGES} images in {elapsed:.1f}s, '
        f'{len(attempts_per_request)} requests, {counters["grpc_requests"]} attempts '
        f'({counters["grpc_retries"]} retries); attempts per image mean {attempts.mean():.2f}, '
        f'max {attempts.max()} (bound {max_attempts_within(RETRY_BUDGET_SECS)}); '
        f'server outcomes {dict(faults.outcomes)}; '
        f'server saw {len(server.predict_request_bytes)} calls; '
        f'dead letters {counts["dead_letters"]}')


# ------------------------------------------------------------------------- 2. new version mid-job


VERSION_IMAGES = 800
THRESHOLDS = {'1': 0.50, '2': 0.52}   # per version, in its planet.json


@pytest.mark.slow
def test_a_new_version_mid_job_is_named_on_every_row(tmp_path, chips):
  """Version 2 lands while the job runs: rows name the version that answered, with its outputs."""
  copies = link_copies(chips, tmp_path / 'images', VERSION_IMAGES)
  export_base = tmp_path / 'export'
  export_version(export_base, seed=1, ground_threshold=THRESHOLDS['1'])
  keras.utils.set_random_seed(2)
  second_model = build_model(IMAGE_SIZE)   # other weights; built here, exported mid-job
  base_path = str(export_base / schema.MODEL_NAME)
  # One 16-image request at a time, 0.05 s each; 0.5 s while version 2 is exported and loaded,
  # so that the switch falls mid-job however slow the export is.
  server = LocalServingServer(base_path, poll_seconds=0.2, faults=Faults(latency_secs=0.05))
  server.start()
  switch = {}
  job_done = threading.Event()

  def export_mid_job():
    while len(server.predict_request_bytes) < 15:
      if job_done.wait(0.02):
        return
    switch['requests_before'] = len(server.predict_request_bytes)
    server.set_faults(Faults(latency_secs=0.5))
    export_version(export_base, seed=2, ground_threshold=THRESHOLDS['2'], model=second_model)
    while server.served_version != 2 and not job_done.wait(0.05):
      pass
    switch['requests_at_switch'] = len(server.predict_request_bytes)
    server.set_faults(Faults(latency_secs=0.05))
  exporter = threading.Thread(target=export_mid_job, name='exporter')
  exporter.start()
  try:
    summary = predict.run([
        '--input', str(tmp_path / 'images'), '--output_dir', str(tmp_path / 'out'),
        '--serving_address', server.address, '--model_dir', base_path, '--batch_size', '16',
        '--label_rule', 'none'])   # the ground tags below: each version's thresholds alone
  finally:
    job_done.set()
    exporter.join()
    server.stop()
  assert server.served_version == 2 and 'requests_at_switch' in switch
  assert len(server.predict_request_bytes) > switch['requests_at_switch'], 'switched after the job'

  rows = read_jsonl(tmp_path / 'out' / 'predictions-*.jsonl')
  per_version = collections.Counter(r['model_version'] for r in rows)
  assert sorted(per_version) == ['1', '2'] and sum(per_version.values()) == VERSION_IMAGES
  assert summary['model_versions'] == ['1', '2']
  assert summary['predictions_per_version'] == dict(per_version)
  with open(tmp_path / 'out' / 'manifest.json') as f:
    assert json.load(f)['model']['versions_seen'] == ['1', '2']

  # Each row's probabilities are those of the version it names, on the decoder's pixels; the two
  # versions disagree, so a row labelled with the wrong version cannot pass.
  chips_dir, _ = chips
  distinct = sorted(set(copies.values()))
  pixels = np.stack([decode_image((chips_dir / f'{name}.jpg').read_bytes(), IMAGE_SIZE)
                     for name in distinct])
  expected = {}
  for version in ('1', '2'):
    outputs = tf.saved_model.load(os.path.join(base_path, version)).signatures[
        schema.SERVING_SIGNATURE](**{schema.INPUT_IMAGES: tf.constant(pixels)})
    expected[version] = {name: {head: outputs[head].numpy()[i] for head in schema.OUTPUT_NAMES}
                         for i, name in enumerate(distinct)}
  version_gap = min(np.abs(expected['1'][n][schema.OUTPUT_GROUND]
                           - expected['2'][n][schema.OUTPUT_GROUND]).max() for n in distinct)
  assert version_gap > 1e-3
  decided_differently = 0
  for row in rows:
    want = expected[row['model_version']][copies[row['image_name']]]
    for head, labels in ((schema.OUTPUT_WEATHER, schema.WEATHER_LABELS),
                         (schema.OUTPUT_GROUND, schema.GROUND_LABELS)):
      got = np.array([row[head][label] for label in labels])
      assert np.abs(got - want[head]).max() < 1e-5, (row['image_name'], row['model_version'], head)
    # Tags are decided with the thresholds of the version that answered (untrained outputs are
    # near 0.5, so thresholds of 0.50 and 0.52 decide some labels differently).
    def ground_tags(version):
      return [label for label, p in zip(schema.GROUND_LABELS, want[schema.OUTPUT_GROUND])
              if p > THRESHOLDS[version]]
    row_ground_tags = [t for t in row['tags'] if t in schema.GROUND_LABELS]
    assert row_ground_tags == ground_tags(row['model_version'])
    decided_differently += ground_tags('1') != ground_tags('2')
  assert decided_differently > 0
  print(f'\nversion change: {dict(sorted(per_version.items()))} predictions per version; version 2 '
        f'exported after {switch["requests_before"]} requests, served from request '
        f'{switch["requests_at_switch"]} of {len(server.predict_request_bytes)}')


# ----------------------------------------------------------------------------- 3. memory


SMALL_RUN, LARGE_RUN = 1000, 10000
# Peak RSS may not grow with the number of images: 10x the images within 1.25x + 100 MB.
RSS_GROWTH_FACTOR, RSS_SLACK_BYTES = 1.25, 100 * 2**20


# Runs a command and prints its peak RSS in kilobytes. A small, fresh process does the waiting: a
# child's ru_maxrss starts at what it inherited by fork, and this test process holds TensorFlow.
_MEASURE_PEAK_RSS = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
error = process.stderr.read()
_, status, usage = os.wait4(process.pid, 0)
process.returncode = os.waitstatus_to_exitcode(status)
if process.returncode:
  sys.exit(error.decode(errors='replace')[-3000:])
print(usage.ru_maxrss)
"""


def peak_rss_of(argv: list[str]) -> int:
  """Runs `python ARGV` in a child process; returns its peak resident set size in bytes."""
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  measured = subprocess.run([sys.executable, '-c', _MEASURE_PEAK_RSS, sys.executable, *argv],
                            cwd=REPO, env=env, capture_output=True, text=True, check=False)
  assert measured.returncode == 0, measured.stderr
  return int(measured.stdout) * 1024   # kilobytes on Linux


def write_labels_csv(path, copies: dict[str, str], tags: dict[str, list[str]]) -> None:
  path.write_text('image_name,tags\n' + ''.join(
      f'{name},{" ".join(tags[source])}\n' for name, source in copies.items()))


def assert_flat(what: str, peaks: dict[int, int]) -> None:
  small, large = peaks[SMALL_RUN], peaks[LARGE_RUN]
  print(f'\n{what}: peak RSS {small / 2**20:.0f} MiB at {SMALL_RUN} images, '
        f'{large / 2**20:.0f} MiB at {LARGE_RUN} ({large / small:.2f}x)')
  assert large <= small * RSS_GROWTH_FACTOR + RSS_SLACK_BYTES, (what, peaks)


@pytest.mark.slow
def test_prediction_memory_does_not_grow_with_images(tmp_path, chips, export_base):
  peaks = {}
  for count in (SMALL_RUN, LARGE_RUN):
    link_copies(chips, tmp_path / f'images_{count}', count)
    peaks[count] = peak_rss_of([
        '-m', 'beam_jobs.predict', '--input', str(tmp_path / f'images_{count}'),
        '--output_dir', str(tmp_path / f'out_{count}'),
        '--model_dir', str(export_base / schema.MODEL_NAME)])
    with open(tmp_path / f'out_{count}' / 'summary.json') as f:
      assert json.load(f)['counts']['predictions'] == count
  assert_flat('predict (in-process model)', peaks)


@pytest.mark.slow
def test_preprocess_memory_does_not_grow_with_images(tmp_path, chips):
  _, tags = chips
  peaks = {}
  for count in (SMALL_RUN, LARGE_RUN):
    copies = link_copies(chips, tmp_path / f'images_{count}', count)
    write_labels_csv(tmp_path / f'labels_{count}.csv', copies, tags)
    peaks[count] = peak_rss_of([
        '-m', 'beam_jobs.preprocess', '--labels_csv', str(tmp_path / f'labels_{count}.csv'),
        '--images_dir', str(tmp_path / f'images_{count}'),
        '--output_dir', str(tmp_path / f'out_{count}'), '--image_size', str(IMAGE_SIZE)])
    with open(tmp_path / f'out_{count}' / 'manifest.json') as f:
      manifest = json.load(f)
    examples = manifest['counts']['examples']
    assert examples['train'] + examples['eval'] == count
    # The shards hold every record, whole: they were written from parts, not from one group.
    for split in ('train', 'eval'):
      shards = [str(tmp_path / f'out_{count}' / shard) for shard in manifest['shards'][split]]
      assert sum(1 for _ in tf.data.TFRecordDataset(shards)) == examples[split]
    assert sorted(os.listdir(tmp_path / f'out_{count}' / 'train')) == [
        os.path.basename(shard) for shard in manifest['shards']['train']]   # no parts left
  assert_flat('preprocess', peaks)
