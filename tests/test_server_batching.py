"""Server-side batching in the local server (`--enable_batching`): merged model calls, the same
answers as without it, UNAVAILABLE when the batch queue is full, and a client that still predicts
every image through it.

Layers: the parameters file (pure) -> the scheduler with a model of the test's own -> the server
on loopback with the real SavedModel -> the gRPC handler in a TestPipeline against a full queue.
"""
import concurrent.futures
import os
import subprocess
import sys
import threading
import time

import apache_beam as beam
import grpc
import numpy as np
import pytest
import requests
from apache_beam.ml.inference.base import KeyedModelHandler
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to
from tensorflow_serving.apis import prediction_service_pb2_grpc

from beam_jobs.common import progress
from beam_jobs.predict.backends.tf_serving import ServingGrpcHandler
from model import schema
from model import serve
from model.serving.batching import QUEUE_FULL_MESSAGE
from model.serving.batching import BatchingParameters
from model.serving.batching import BatchScheduler
from model.serving.batching import parse_batching_parameters
from model.serving.faults import Faults
from model.serving.local_server import LocalServingServer
from model.serving.protocol import build_predict_request, tensor_from_proto
from model.serving.refusal import Refusal
from tests.conftest import make_export_base

IMAGE_SIZE = 32
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  return str(make_export_base(tmp_path_factory, IMAGE_SIZE) / schema.MODEL_NAME)


def images(count: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE, 3),
                                              dtype=np.uint8)


# --- The parameters file (pure) -----------------------------------------------------------------

def test_parameters_file_in_tf_servings_text_format_over_its_defaults():
  parameters = parse_batching_parameters(
      '# as in the TF Serving batching guide\n'
      'max_batch_size { value: 128 }\n'
      'batch_timeout_micros { value: 5000 }\n')

  assert (parameters.max_batch_size, parameters.batch_timeout_micros) == (128, 5000)
  assert parameters.max_enqueued_batches == 10
  assert parameters.num_batch_threads == len(os.sched_getaffinity(0))


@pytest.mark.parametrize('text,message', [
    ('max_batch_size: 128', 'cannot read'),
    ('allowed_batch_sizes { value: 4 }', 'not implemented by the local server'),
    ('max_batch_size { value: 0 }', 'max_batch_size must be at least 1'),
    ('batch_timeout_micros { value: -1 }', 'must be 0 or more'),
])
def test_parameters_file_refusals_say_what_is_wrong(text, message):
  with pytest.raises(ValueError, match=message):
    parse_batching_parameters(text)


# --- The scheduler, with a model of the test's own ----------------------------------------------

def test_a_full_queue_answers_unavailable_and_the_queued_requests_still_run():
  started, release = threading.Event(), threading.Event()

  def slow_double(arrays):
    started.set()
    release.wait(10)
    return {'y': arrays['x'] * 2}

  calls = []
  scheduler = BatchScheduler(BatchingParameters(max_batch_size=4, num_batch_threads=1,
                                                max_enqueued_batches=1),
                             on_model_call=lambda rows, requests: calls.append((rows, requests)))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    first = pool.submit(scheduler.run, 'k', slow_double, {'x': np.arange(4)}, 10)
    assert started.wait(10)   # a full batch: its thread runs it (and is held there)
    second = pool.submit(scheduler.run, 'k', slow_double, {'x': np.arange(10, 13)}, 10)
    deadline = time.monotonic() + 10
    while scheduler.enqueued_batches('k') < 1 and time.monotonic() < deadline:
      time.sleep(0.01)

    with pytest.raises(Refusal) as refused:   # would need a second waiting batch
      scheduler.run('k', slow_double, {'x': np.arange(2)}, 10)
    release.set()

    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.message == QUEUE_FULL_MESSAGE
    assert first.result(10)['y'].tolist() == [0, 2, 4, 6]
    assert second.result(10)['y'].tolist() == [20, 22, 24]
  scheduler.close()
  assert calls == [(4, 1), (3, 1)]


def test_a_request_larger_than_a_batch_is_invalid_and_a_model_error_reaches_every_request():
  def failing(arrays):
    raise RuntimeError(f'model broke on {len(arrays["x"])} rows')

  scheduler = BatchScheduler(BatchingParameters(max_batch_size=4, num_batch_threads=1,
                                                batch_timeout_micros=2_000_000))
  with pytest.raises(Refusal) as refused:
    scheduler.run('k', failing, {'x': np.arange(5)}, 10)
  assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
  assert 'Task size 5 is larger than maximum input batch size 4' in refused.value.message

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    answers = [pool.submit(scheduler.run, 'k', failing, {'x': np.arange(2)}, 10)
               for _ in range(2)]
    # Both wait in one batch (2 + 2 rows fill it), which fails once for both.
    for answer in answers:
      with pytest.raises(RuntimeError, match='model broke on 4 rows'):
        answer.result(10)
  scheduler.close()


# --- The server, with the real SavedModel -------------------------------------------------------

def predict_in_requests(address: str, pixels: np.ndarray, per_request: int) -> list[np.ndarray]:
  """Sends every request at once; returns the weather rows of each answer, in order."""
  with grpc.insecure_channel(address) as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    futures = [stub.Predict.future(build_predict_request(list(pixels[i:i + per_request])),
                                   timeout=30)
               for i in range(0, len(pixels), per_request)]
    return [tensor_from_proto(future.result().outputs[schema.OUTPUT_WEATHER])
            for future in futures]


def test_concurrent_requests_are_merged_into_one_model_call_with_the_same_answers(model_dir):
  pixels = images(32)
  with LocalServingServer(model_dir) as unbatched:
    expected = predict_in_requests(unbatched.address, pixels, 8)
  # A long timeout: the batch runs when its 32 rows are there, which only merging can give.
  parameters = BatchingParameters(max_batch_size=32, batch_timeout_micros=20_000_000,
                                  num_batch_threads=1)
  with LocalServingServer(model_dir, batching=parameters) as batched:
    answers = predict_in_requests(batched.address, pixels, 8)

  assert unbatched.model_call_requests == [1, 1, 1, 1]
  assert batched.model_call_requests == [4] and batched.model_call_rows == [32]
  for got, want in zip(answers, expected):
    # One call of 32 rows against four of 8: the same model, rounding aside (oneDNN may block
    # a larger batch differently).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_rest_calls_are_batched_too(model_dir):
  pixels = images(8, seed=3)
  parameters = BatchingParameters(max_batch_size=8, batch_timeout_micros=20_000_000,
                                  num_batch_threads=1)
  with LocalServingServer(model_dir, rest_api_port=0, batching=parameters) as server:
    url = f'http://{server.rest_address}/v1/models/{schema.MODEL_NAME}:predict'

    def post(rows):
      body = {'signature_name': 'serving_default', 'inputs': {'images': rows.tolist()}}
      return requests.post(url, json=body, timeout=60).json()['outputs']['weather']

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      answers = list(pool.map(post, [pixels[:4], pixels[4:]]))   # 8 rows: the batch is full
    grpc_answer = predict_in_requests(server.address, pixels, 8)[0]

  assert server.model_call_requests == [2, 1]
  np.testing.assert_allclose(np.concatenate(answers), grpc_answer, rtol=1e-5, atol=1e-6)


def test_the_job_handler_retries_a_full_queue_and_predicts_every_image(model_dir):
  # One batch thread held 0.2 s per call, one batch allowed to wait: of the handler's 4 requests
  # of 8 images in flight, the third and fourth find the queue full.
  parameters = BatchingParameters(max_batch_size=8, num_batch_threads=1, max_enqueued_batches=1)
  with LocalServingServer(model_dir, batching=parameters,
                          faults=Faults(model_latency_secs=0.2)) as server:
    handler = ServingGrpcHandler(server.address, max_images_per_request=8,
                                 max_requests_in_flight=4, min_batch_size=32, max_batch_size=32,
                                 initial_backoff_secs=0.05, max_backoff_secs=0.5,
                                 throttle_delay_secs=0.2)
    keyed = [(f'chip_{i}', image) for i, image in enumerate(images(64))]
    pipeline = test_pipeline.TestPipeline()
    outcomes = (pipeline | beam.Create(keyed, reshuffle=False)
                | RunInference(KeyedModelHandler(handler))
                | beam.MapTuple(lambda name, result: (name, result.model_id)))
    assert_that(outcomes, equal_to([(f'chip_{i}', f'{schema.MODEL_NAME}/1') for i in range(64)]))
    result = pipeline.run()
    result.wait_until_finish()
    counters = progress.query_counters(result)

  assert counters['grpc_predicted_images'] == 64
  assert counters.get('grpc_unavailable_images', 0) == counters.get('grpc_failed_images', 0) == 0
  assert counters['grpc_retries'] > 0
  # Every request the server saw was either refused (queue full) or answered in a model call.
  refused = len(server.predict_request_bytes) - sum(server.model_call_requests)
  assert refused == counters['grpc_retries'] > 0
  assert sum(server.model_call_rows) == 64


@pytest.mark.slow
def test_command_line_batching_flags(model_dir, tmp_path, capsys):
  parameters_file = tmp_path / 'batching.txt'
  parameters_file.write_text('max_batch_size { value: 16 }\nnum_batch_threads { value: 1 }\n')
  with pytest.raises(SystemExit) as exited:
    serve.main(['--model_base_path', model_dir, '--port', '0', '--max_batch_size', '8',
                '--batching_parameters_file', str(parameters_file)])
  assert exited.value.code == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      'python -m model.serve: error: --batching_parameters_file and the batching parameters go '
      'with --enable_batching']

  process = subprocess.Popen(
      [sys.executable, '-m', 'model.serve', '--model_base_path', model_dir, '--port', '0',
       '--enable_batching', '--batching_parameters_file', str(parameters_file),
       '--max_batch_size', '8'],
      stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  try:
    for line in process.stderr:
      if 'listening on' in line:
        break
    else:
      pytest.fail('the server never said where it listens')
    # The file's num_batch_threads, the flag's max_batch_size over the file's, TF's defaults.
    assert ('BatchingParameters(max_batch_size=8, batch_timeout_micros=0, num_batch_threads=1, '
            'max_enqueued_batches=10)') in line
  finally:
    process.terminate()
    process.wait(timeout=20)
