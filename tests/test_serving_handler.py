"""The gRPC prediction backend: pure rules, then the handler against a real server on loopback.

Layers: pure functions (no server) -> `run_inference` against the local server (`model.serving`)
on loopback, with faults injected -> RunInference + KeyedModelHandler in a TestPipeline, counters
asserted.
The tests without faults also run against `tensorflow_model_server` where it is on the PATH.
"""
import datetime
import ipaddress
import random
import shutil
import socket
import threading
import time

import apache_beam as beam
import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from apache_beam.internal import pickler
from apache_beam.ml.inference.base import KeyedModelHandler
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to
from tensorflow_serving.apis import get_model_metadata_pb2

from beam_jobs.common import progress
from beam_jobs.predict.backends import tf_serving as sh
from beam_jobs.predict.backends import retry_policy as serving_retry
from beam_jobs.predict.backends import serving_address
from beam_jobs.predict.backends import serving_base
from beam_jobs.predict.backends import serving_check
from beam_jobs.predict.backends import transport
from model import schema
from model.errors import InputRefused
from model.errors import Reason
from model.export import export_model
from model.network import build_model
from model.saved_model_info import read_signature_defs
from model.serving import protocol
from model.serving.faults import Faults
from model.serving.local_server import LocalServingServer
from model.serving.model_server import ModelServerProcess
from tests.conftest import make_export_base

IMAGE_SIZE = 32
BACKENDS = [
    'local',
    pytest.param('tensorflow_model_server', marks=pytest.mark.skipif(
        shutil.which('tensorflow_model_server') is None,
        reason='tensorflow_model_server is not on the PATH')),
]
# Retries fast enough for tests; the budget stays the default 30 s unless a test says otherwise.
FAST = dict(initial_backoff_secs=0.05, max_backoff_secs=0.5, throttle_delay_secs=0.2)


def images(count: int, size: int = IMAGE_SIZE, seed: int = 0) -> list[np.ndarray]:
  return list(np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8))


@pytest.fixture(scope='module')
def export_base(tmp_path_factory):
  """This module's own export (its tests add versions), at IMAGE_SIZE."""
  return make_export_base(tmp_path_factory, IMAGE_SIZE)


@pytest.fixture(scope='module')
def model_dir(export_base):
  return str(export_base / schema.MODEL_NAME)


@pytest.fixture(scope='module', params=BACKENDS)
def server(request, model_dir):
  running = (LocalServingServer(model_dir) if request.param == 'local'
             else ModelServerProcess(model_dir))
  running.start()
  yield running
  running.stop()


@pytest.fixture
def local_server(model_dir):
  """A local server of its own, for tests that inject faults or stop it."""
  running = LocalServingServer(model_dir)
  running.start()
  yield running
  running.stop()


def run_direct(handler: sh.ServingGrpcHandler, batch: list[np.ndarray]) -> list[PredictionResult]:
  client = handler.load_model()
  try:
    return list(handler.run_inference(batch, client))
  finally:
    client.close()


def assert_all_predicted(results, batch, version: int = 1) -> None:
  assert len(results) == len(batch)
  for result, image in zip(results, batch):
    assert result.example is image
    assert not isinstance(result.inference, InputRefused), result.inference
    assert result.model_id == f'{schema.MODEL_NAME}/{version}'
    assert result.inference['model_version'] == str(version)
    assert result.inference['weather'].dtype == np.float32
    assert result.inference['weather'].shape == (schema.NUM_WEATHER,)
    assert result.inference['ground'].shape == (schema.NUM_GROUND,)


# --- Pure: transport ----------------------------------------------------------------------------

@pytest.mark.parametrize('address,host,port', [
    ('localhost:8500', 'localhost', 8500), ('10.1.2.3:9000', '10.1.2.3', 9000),
    ('[::1]:8500', '::1', 8500), ('tfserving.internal:443', 'tfserving.internal', 443)])
def test_parse_address(address, host, port):
  assert protocol.parse_address(address) == (host, port)


@pytest.mark.parametrize('address', ['localhost', 'localhost:', ':8500', 'host:http',
                                     'host:70000', '::1:8500', '[::1:8500'])
def test_parse_address_refuses_malformed(address):
  with pytest.raises(ValueError, match='HOST:PORT|IPv6'):
    protocol.parse_address(address)


@pytest.mark.parametrize('host,loopback', [
    ('localhost', True), ('LOCALHOST', True), ('127.0.0.1', True), ('127.3.4.5', True),
    ('::1', True), ('10.0.0.1', False), ('0.0.0.0', False), ('localhost.evil.com', False),
    ('tfserving', False), ('::', False)])
def test_is_loopback_host(host, loopback):
  assert protocol.is_loopback_host(host) is loopback


def test_plaintext_only_to_loopback_unless_allowed():
  assert protocol.check_transport('127.0.0.1:8500') == 'insecure'
  assert protocol.check_transport('[::1]:8500') == 'insecure'
  assert protocol.check_transport('tfserving:8500', use_tls=True) == 'tls'
  assert protocol.check_transport('10.0.0.7:8500', allow_insecure=True) == 'insecure'
  with pytest.raises(ValueError, match='refusing a plaintext gRPC channel to 10.0.0.7.*--tls.*'
                                       '--allow_insecure'):
    protocol.check_transport('10.0.0.7:8500')
  with pytest.raises(ValueError, match='contradict'):
    protocol.check_transport('localhost:8500', use_tls=True, allow_insecure=True)
  # The handler refuses at construction, before any worker or connection exists.
  with pytest.raises(ValueError, match='refusing a plaintext'):
    sh.ServingGrpcHandler('tfserving.internal:8500')
  sh.ServingGrpcHandler('tfserving.internal:8500', allow_insecure=True)


# --- Pure: requests and responses ---------------------------------------------------------------

def test_plan_keeps_256px_batches_under_the_byte_limit():
  batch = [np.zeros((256, 256, 3), np.uint8)] * 64   # 12.6 MB
  groups, too_large = serving_base.plan_requests(batch, serving_base.DEFAULT_MAX_REQUEST_BYTES, 32)
  assert too_large == []
  assert [len(g) for g in groups] == [20, 20, 20, 4]
  assert sum(groups, []) == list(range(64))
  for group in groups:
    request = protocol.build_predict_request([batch[i] for i in group])
    assert request.ByteSize() <= serving_base.DEFAULT_MAX_REQUEST_BYTES


def test_plan_splits_on_shape_and_count_and_sets_aside_oversize_images():
  small, other = np.zeros((4, 4, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
  huge = np.zeros((1024, 1024, 3), np.uint8)
  batch = [small, small, small, other, huge, other, small]
  groups, too_large = serving_base.plan_requests(batch, 1024 * 1024, max_images_per_request=2)
  assert groups == [[0, 1], [2], [3, 5], [6]]
  assert too_large == [4]


def test_image_problem():
  assert serving_base.image_problem(np.zeros((32, 32, 3), np.uint8)) is None
  assert serving_base.image_problem(np.zeros((32, 32, 3), np.uint8), image_size=32) is None
  assert 'takes 64x64' in serving_base.image_problem(np.zeros((32, 32, 3), np.uint8), image_size=64)
  assert 'float32 [32, 32, 3]' in serving_base.image_problem(np.zeros((32, 32, 3), np.float32))
  assert 'uint8 [32, 32]' in serving_base.image_problem(np.zeros((32, 32), np.uint8))
  assert 'numpy array' in serving_base.image_problem(b'jpeg bytes')


def test_request_tensor_is_raw_bytes_that_tensorflow_reads_back():
  batch = images(3)
  request = protocol.build_predict_request(batch, model_version=4,
                                           signature=schema.SERVING_SIGNATURE)
  proto = request.inputs[schema.INPUT_IMAGES]
  assert len(proto.tensor_content) == 3 * IMAGE_SIZE * IMAGE_SIZE * 3
  assert not proto.int_val
  np.testing.assert_array_equal(tf.make_ndarray(proto), np.stack(batch))
  assert request.model_spec.version.value == 4
  assert list(request.output_filter) == list(schema.OUTPUT_NAMES)


def _answer(weather: np.ndarray, ground: np.ndarray, encode) -> predict_pb2.PredictResponse:
  response = predict_pb2.PredictResponse()
  response.model_spec.version.value = 3
  response.outputs[schema.OUTPUT_WEATHER].CopyFrom(encode(weather))
  response.outputs[schema.OUTPUT_GROUND].CopyFrom(encode(ground))
  return response


@pytest.mark.parametrize('encode', [tf.make_tensor_proto,              # tensor_content
                                    protocol.tensor_as_proto_field])  # float_val, as TF Serving does
def test_the_grpc_transport_reads_both_encodings(encode):
  weather = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
  ground = np.arange(26, dtype=np.float32).reshape(2, 13) / 29
  version, outputs = sh.GrpcTransport('localhost:1').decode(_answer(weather, ground, encode))
  assert version == 3
  np.testing.assert_array_equal(outputs[schema.OUTPUT_WEATHER], weather)
  np.testing.assert_array_equal(outputs[schema.OUTPUT_GROUND], ground)


def test_the_grpc_transport_fills_a_short_value_field_with_its_last_value():
  def constant(array):
    return tf.make_tensor_proto(1.5, shape=array.shape, dtype=tf.float32)
  _, outputs = sh.GrpcTransport('localhost:1').decode(
      _answer(np.zeros((2, 4)), np.zeros((2, 13)), constant))
  np.testing.assert_array_equal(outputs[schema.OUTPUT_GROUND], np.full((2, 13), 1.5, np.float32))


def test_transient_codes_and_backoff():
  assert serving_retry.is_transient(grpc.StatusCode.UNAVAILABLE)
  assert serving_retry.is_transient(grpc.StatusCode.DEADLINE_EXCEEDED)
  assert serving_retry.is_transient(grpc.StatusCode.RESOURCE_EXHAUSTED, 'queue full')
  assert not serving_retry.is_transient(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        'Received message larger than max (5 vs. 4)')
  assert not serving_retry.is_transient(grpc.StatusCode.INVALID_ARGUMENT)
  assert not serving_retry.is_transient(grpc.StatusCode.NOT_FOUND)
  assert serving_retry.may_be_one_image(grpc.StatusCode.INVALID_ARGUMENT)
  assert not serving_retry.may_be_one_image(grpc.StatusCode.NOT_FOUND)
  assert not serving_retry.may_be_one_image(grpc.StatusCode.FAILED_PRECONDITION)
  delays = serving_retry.backoff_delays(0.25, 4.0, random.Random(0))
  caps = [0.25, 0.5, 1, 2, 4, 4, 4]
  for cap in caps:
    assert cap / 2 <= next(delays) <= cap


def test_requests_in_flight_do_not_throttle_a_healthy_server():
  from apache_beam.io.components.adaptive_throttler import AdaptiveThrottler
  now = time.time() * 1000
  # Beam's own throttler counts an attempt when it leaves: with 4 requests in flight and none
  # answered yet, the next one is throttled with P = (4 - 2 * 0) / (4 + 1).
  beams = AdaptiveThrottler(window_ms=1000, bucket_ms=1000, overload_ratio=2)
  for _ in range(4):
    beams.throttle_request(now)
  assert beams._throttling_probability(now) == pytest.approx(0.8)  # pylint: disable=protected-access

  ours = serving_retry.AnsweredRequestsThrottler(window_ms=1000, bucket_ms=1000, overload_ratio=2,
                                                 namespace='test', throttle_delay_secs=1)
  assert not any(ours.throttle_request(now) for _ in range(1000))   # in flight: not counted
  for _ in range(4):
    ours.answered(now, accepted=True)
  ours.successful_request(now)   # Beam's call around the whole batch adds nothing
  assert not any(ours.throttle_request(now) for _ in range(1000))
  for _ in range(50):   # the server goes away: transient failures count against it
    ours.answered(now, accepted=False)
  assert sum(ours.throttle_request(now) for _ in range(1000)) > 700   # P = (54 - 8) / 55
  assert not any(ours.throttle_request(now + 2000) for _ in range(1000))   # the window moved on


class _ScriptedThrottler:
  """The throttler as the retry policy sees it, throttling the asks numbered `throttled`."""

  throttle_delay_secs = 0.01

  def __init__(self, throttled):
    self.throttled = set(throttled)
    self.asks = 0
    self.successes = 0
    self.failures = 0

  def throttle_request(self, now_ms: float) -> bool:  # pylint: disable=unused-argument
    self.asks += 1
    return self.asks in self.throttled

  def answered(self, now_ms: float, accepted: bool) -> None:  # pylint: disable=unused-argument
    self.successes += accepted
    self.failures += not accepted


def test_a_client_throttled_before_any_attempt_waits_then_sends():
  throttler = _ScriptedThrottler(throttled={1, 2})
  tally = serving_retry.CallTally()
  answer = predict_pb2.PredictResponse()

  response = serving_retry.RetryPolicy(retry_budget_secs=0.0).call(
      lambda timeout: answer, request_bytes=7, throttler=throttler, tally=tally,
      address='here:8500')

  assert response is answer
  assert (throttler.asks, throttler.successes, tally.requests, tally.retries) == (3, 1, 1, 0)
  assert tally.request_bytes == [7]
  assert tally.throttled_secs == pytest.approx(2 * throttler.throttle_delay_secs)


def test_a_transient_failure_is_retried_and_a_refusal_raised_at_once():
  throttler = _ScriptedThrottler(throttled=())
  failures = [serving_retry.CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, 'queue full'),
              serving_retry.CallFailed(grpc.StatusCode.UNAVAILABLE, 'away', answered=False)]
  deadlines = []

  def send(timeout):
    deadlines.append(timeout)
    if failures:
      raise failures.pop(0)
    return 'answer'

  policy = serving_retry.RetryPolicy(timeout_secs=3, initial_backoff_secs=0.01,
                                     max_backoff_secs=0.01)
  tally = serving_retry.CallTally()
  answer = policy.call(send, request_bytes=5, throttler=throttler, tally=tally, address='x')
  assert answer == 'answer'
  assert deadlines == [3, 3, 3]   # every attempt has the deadline
  assert (tally.requests, tally.retries, tally.request_bytes) == (3, 2, [5, 5, 5])
  assert (throttler.successes, throttler.failures) == (1, 2)

  refused = serving_retry.CallFailed(grpc.StatusCode.INVALID_ARGUMENT, 'bad image')

  def send_refused(timeout):
    raise refused
  tally = serving_retry.CallTally()
  with pytest.raises(serving_retry.CallFailed) as raised:
    policy.call(send_refused, request_bytes=5, throttler=throttler, tally=tally, address='x')
  assert raised.value is refused and (tally.requests, tally.retries) == (1, 0)
  assert throttler.successes == 2   # a refusal of the input counts for the server


def test_a_client_throttled_after_a_failure_gives_up_when_the_budget_runs_out():
  throttler = _ScriptedThrottler(throttled=range(2, 10_000))
  tally = serving_retry.CallTally()

  def predict(timeout):
    raise serving_retry.CallFailed(grpc.StatusCode.UNAVAILABLE, 'server away', answered=False)

  policy = serving_retry.RetryPolicy(retry_budget_secs=0.2, initial_backoff_secs=0.01,
                                     max_backoff_secs=0.01)
  with pytest.raises(serving_retry.GaveUp, match=r'^here:8500: UNAVAILABLE after 1 attempt\(s\) '
                     r'over 0\.\ds, then throttled client-side \(retry budget 0\.2s\): '
                     r'server away$'):
    policy.call(predict, request_bytes=7, throttler=throttler, tally=tally, address='here:8500')

  assert (tally.requests, tally.retries, throttler.successes, throttler.failures) == (1, 1, 0, 1)
  assert tally.throttled_secs >= 0.15


def signature_map(model_dir: str) -> get_model_metadata_pb2.SignatureDefMap:
  found = get_model_metadata_pb2.SignatureDefMap()
  for name, signature in read_signature_defs(model_dir + '/1').items():
    found.signature_def[name].CopyFrom(signature)
  return found


def test_served_image_size_names_expected_and_found(model_dir):
  found = signature_map(model_dir)
  assert serving_check.served_image_size(found, schema.SERVING_SIGNATURE, 'here') == IMAGE_SIZE
  with pytest.raises(ValueError, match=r"here has no signature 'nope'; it has "
                                       r"\['predict_float', 'serving_default', 'serving_tta'\]"):
    serving_check.served_image_size(found, 'nope', 'here')
  with pytest.raises(ValueError, match=r"takes inputs \['input_image'\]; expected one input "
                                       r"'images'"):
    serving_check.served_image_size(found, schema.FLOAT_SIGNATURE, 'here')
  with pytest.raises(ValueError, match='takes 32x32 images; expected 128x128'):
    serving_check.served_image_size(found, schema.SERVING_SIGNATURE, 'here', image_size=128)
  found.signature_def[schema.SERVING_SIGNATURE].outputs.pop(schema.OUTPUT_GROUND)
  with pytest.raises(ValueError, match="output 'ground' .* is missing"):
    serving_check.served_image_size(found, schema.SERVING_SIGNATURE, 'here')


def test_handler_pickles_and_batches():
  handler = sh.ServingGrpcHandler('127.0.0.1:8500', max_batch_size=48)
  restored = pickler.loads(pickler.dumps(handler))
  assert restored.batch_elements_kwargs() == {'min_batch_size': 48, 'max_batch_size': 48}
  assert restored.get_num_bytes(images(2)) == 2 * IMAGE_SIZE * IMAGE_SIZE * 3
  with pytest.raises(ValueError, match='no inference_args'):
    restored.validate_inference_args({'x': 1})


# --- check_serving_model against a server -------------------------------------------------------

def test_check_serving_model(server):
  assert sh.check_serving_model(server.address) == (IMAGE_SIZE, 1)
  assert sh.check_serving_model(server.address, model_version=1, image_size=IMAGE_SIZE) == (
      IMAGE_SIZE, 1)


@pytest.mark.parametrize('kwargs,message', [
    (dict(model_name='Other'), r"does not serve Other \(latest version\).*Latest\(Other\)"),
    (dict(model_version=7), r'does not serve PlanetModel version 7 .*it has versions 1 '
                            r'\(AVAILABLE\)'),
    (dict(signature='nope'), r"has no signature 'nope'; it has \['predict_float', "
                             r"'serving_default', 'serving_tta'\]"),
    (dict(image_size=128), r'takes 32x32 images; expected 128x128'),
])
def test_check_serving_model_names_expected_and_found(server, kwargs, message):
  with pytest.raises(ValueError, match=message):
    sh.check_serving_model(server.address, **kwargs)


def test_check_serving_model_without_a_server(local_server):
  address = local_server.address
  local_server.stop()
  started = time.monotonic()
  with pytest.raises(ValueError, match=f'no TF Serving answered at {address} within 1s') as refused:
    sh.check_serving_model(address, timeout_secs=1)
  assert time.monotonic() - started < 5
  assert 'start one (docs/serving.md) or fix the address' in str(refused.value)


@pytest.mark.parametrize('address,given', [
    ('http://localhost:8501', '--serving_address localhost:8501:'),
    ('https://tfserving.internal:443', '--serving_address tfserving.internal:443 --tls:'),
    ('grpc://127.0.0.1:8500/', '--serving_address 127.0.0.1:8500:')])
def test_an_address_with_a_scheme_is_refused_in_one_line(address, given):
  for make in (lambda: sh.check_serving_model(address, timeout_secs=1),
               lambda: sh.ServingGrpcHandler(address)):
    with pytest.raises(ValueError) as refused:
      make()
    message = str(refused.value)
    assert 'give HOST:PORT without a scheme' in message and given in message, message
    assert 'IPv6' not in message and '\n' not in message


def test_the_probe_is_bounded_against_a_server_that_never_answers():
  with socket.create_server(('127.0.0.1', 0)) as silent:   # accepts (its backlog), never writes
    address = f'127.0.0.1:{silent.getsockname()[1]}'
    started = time.monotonic()
    assert serving_address.answering_protocol(address, timeout_secs=0.5) is None
    assert time.monotonic() - started < 2
  assert serving_address.answering_protocol(address, timeout_secs=0.5) is None   # closed: refused


# --- run_inference against a server -------------------------------------------------------------

def test_predictions_match_the_saved_model(server, model_dir):
  batch = images(10)
  handler = sh.ServingGrpcHandler(server.address, max_images_per_request=4, image_size=IMAGE_SIZE)

  results = run_direct(handler, batch)

  assert_all_predicted(results, batch)
  expected = tf.saved_model.load(model_dir + '/1').signatures[schema.SERVING_SIGNATURE](
      images=tf.constant(np.stack(batch)))
  for name in schema.OUTPUT_NAMES:
    got = np.stack([r.inference[name] for r in results])
    assert np.max(np.abs(got - expected[name].numpy())) < 1e-6


def test_refused_elements_never_reach_the_server(local_server):
  batch = images(3) + [np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32),
                       np.zeros((16, 16, 3), np.uint8)]
  handler = sh.ServingGrpcHandler(local_server.address, image_size=IMAGE_SIZE)

  results = run_direct(handler, batch)

  assert_all_predicted(results[:3], batch[:3])
  for result in results[3:]:
    assert result.inference.reason == Reason.INFERENCE_FAILED and result.model_id is None
  assert len(local_server.predict_request_bytes) == 1


def test_unavailable_30_percent_every_image_once(local_server):
  local_server.set_faults(Faults(failure_fraction=0.3, seed=5))
  batch = images(60)
  handler = sh.ServingGrpcHandler(local_server.address, max_images_per_request=3, **FAST)

  results = run_direct(handler, batch)

  assert_all_predicted(results, batch)
  # 20 requests needed; the server saw those plus the failed attempts.
  assert len(local_server.predict_request_bytes) > 20


def test_a_batch_streams_its_requests_max_requests_in_flight_at_a_time(local_server):
  handler = sh.ServingGrpcHandler(local_server.address, max_images_per_request=2)
  run_direct(handler, images(1))   # the model traced before the calls that are counted
  local_server.set_faults(Faults(latency_secs=0.5))
  # By default a RunInference batch is REQUESTS_PER_BATCH full requests, 4 of them in flight.
  assert handler.batch_elements_kwargs() == {'min_batch_size': 2 * serving_base.REQUESTS_PER_BATCH,
                                             'max_batch_size': 2 * serving_base.REQUESTS_PER_BATCH}
  batch = images(2 * serving_base.REQUESTS_PER_BATCH)

  results = run_direct(handler, batch)

  assert_all_predicted(results, batch)
  assert len(local_server.predict_request_bytes) == 1 + serving_base.REQUESTS_PER_BATCH
  assert local_server.peak_predicts_in_progress == 4


def test_a_refused_request_is_sent_again_image_by_image(local_server):
  batch = images(6)
  batch[4][0, 0] = (255, 0, 255)
  local_server.set_faults(Faults(
      refuse_image=lambda image: tuple(image[0, 0]) == (255, 0, 255)))
  handler = sh.ServingGrpcHandler(local_server.address, **FAST)

  results = run_direct(handler, batch)

  assert_all_predicted(results[:4] + results[5:], batch[:4] + batch[5:])
  refused = results[4].inference
  assert refused.reason == Reason.INFERENCE_FAILED
  assert 'INVALID_ARGUMENT' in refused.message and 'image 0 refused' in refused.message
  assert local_server.address in refused.message
  assert len(local_server.predict_request_bytes) == 1 + 6


def test_a_model_level_refusal_is_not_repeated_per_image(local_server):
  handler = sh.ServingGrpcHandler(local_server.address, model_version=9, **FAST)

  results = run_direct(handler, images(5))

  assert [r.inference.reason for r in results] == [Reason.INFERENCE_FAILED] * 5
  assert 'NOT_FOUND: Servable not found for request: Specific(PlanetModel, 9)' in (
      results[0].inference.message)
  assert len(local_server.predict_request_bytes) == 1


def test_a_slow_server_meets_the_deadline_and_the_budget(local_server):
  local_server.set_faults(Faults(latency_secs=0.4))
  handler = sh.ServingGrpcHandler(local_server.address, timeout_secs=0.1, retry_budget_secs=0.3,
                                  **FAST)

  (result,) = run_direct(handler, images(1))

  assert result.inference.reason == Reason.UNAVAILABLE
  assert 'DEADLINE_EXCEEDED' in result.inference.message


@pytest.mark.slow
def test_server_restart_of_10_seconds_mid_run(local_server):
  local_server.set_faults(Faults(latency_secs=0.05))
  batch = images(40)
  handler = sh.ServingGrpcHandler(local_server.address, max_images_per_request=1,
                                  max_requests_in_flight=2, **FAST)
  outage = {}

  def stop_for_ten_seconds():
    while len(local_server.predict_request_bytes) < 6:
      time.sleep(0.01)
    local_server.stop()
    outage['requests_before'] = len(local_server.predict_request_bytes)
    time.sleep(10)
    local_server.start()
    outage['restarted'] = time.monotonic()

  restarter = threading.Thread(target=stop_for_ten_seconds)
  restarter.start()
  started = time.monotonic()
  results = run_direct(handler, batch)
  restarter.join()

  assert_all_predicted(results, batch)
  assert time.monotonic() - started >= 10
  assert outage['requests_before'] < 40 <= len(local_server.predict_request_bytes)
  # Back within a few seconds of the restart, not after gRPC's own reconnect backoff.
  assert time.monotonic() - outage['restarted'] < 8


def test_server_gone_past_the_budget_refuses_as_unavailable(local_server):
  handler = sh.ServingGrpcHandler(local_server.address, max_images_per_request=2,
                                  retry_budget_secs=1.0, **FAST)
  before, after = images(4, seed=1), images(5, seed=2)

  predicted = run_direct(handler, before)
  local_server.stop()
  refused = run_direct(handler, after)

  assert_all_predicted(predicted, before)
  assert len(refused) == len(after)
  for result, image in zip(refused, after):
    assert result.example is image and result.model_id is None
    assert result.inference.reason == Reason.UNAVAILABLE
    assert local_server.address in result.inference.message
    assert 'UNAVAILABLE after' in result.inference.message and 'attempt' in result.inference.message


@pytest.fixture(scope='module')
def server_256(tmp_path_factory):
  """A 256x256 model (a tiny network: only the message sizes matter here)."""
  base = tmp_path_factory.mktemp('export_256')
  export_model(build_model(256, architecture=keras.layers.GlobalAveragePooling2D()), str(base))
  return str(base / schema.MODEL_NAME)


def test_large_batches_stay_under_the_limit(server_256):
  batch = images(64, size=256)   # 12.6 MB
  with LocalServingServer(server_256) as server:
    results = run_direct(sh.ServingGrpcHandler(server.address, **FAST), batch)
    sizes = server.predict_request_bytes
  assert_all_predicted(results, batch)
  assert len(sizes) == 4 and max(sizes) <= serving_base.DEFAULT_MAX_REQUEST_BYTES
  assert sum(sizes) > 64 * 256 * 256 * 3


def test_a_server_with_a_smaller_limit_gets_single_images(server_256):
  batch = images(8, size=256)
  with LocalServingServer(server_256, max_receive_message_bytes=1024 * 1024) as server:
    started = time.monotonic()
    results = run_direct(sh.ServingGrpcHandler(server.address, **FAST), batch)
    elapsed = time.monotonic() - started
    sizes = server.predict_request_bytes
  assert_all_predicted(results, batch)
  # gRPC refused the 1.6 MB request before the service saw it, once (an over-size answer is not
  # worth a retry), and the images then went one by one.
  assert len(sizes) == 8 and max(sizes) < 1024 * 1024
  assert elapsed < 5


# --- TLS ----------------------------------------------------------------------------------------

def make_self_signed_certificate() -> tuple[bytes, bytes]:
  """(key PEM, certificate PEM) for localhost and 127.0.0.1, valid for a day."""
  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'localhost')])
  now = datetime.datetime.now(datetime.timezone.utc)
  certificate = (
      x509.CertificateBuilder().subject_name(name).issuer_name(name)
      .public_key(key.public_key()).serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(minutes=5))
      .not_valid_after(now + datetime.timedelta(days=1))
      .add_extension(x509.SubjectAlternativeName([
          x509.DNSName('localhost'), x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]),
          critical=False)
      .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
      .sign(key, hashes.SHA256()))
  key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
  return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def test_tls_with_a_self_signed_certificate(model_dir, tmp_path):
  key, certificate = make_self_signed_certificate()
  (tmp_path / 'ca.pem').write_bytes(certificate)
  roots = transport.read_root_certificates(str(tmp_path / 'ca.pem'))
  with LocalServingServer(model_dir, ssl_key=key, ssl_cert=certificate) as server:
    for host in ['127.0.0.1', 'localhost']:
      address = f'{host}:{server.port}'
      assert sh.check_serving_model(address, use_tls=True, root_certificates=roots) == (
          IMAGE_SIZE, 1)
      handler = sh.ServingGrpcHandler(address, use_tls=True, root_certificates=roots, **FAST)
      batch = images(3)
      assert_all_predicted(run_direct(handler, batch), batch)
    # Plaintext to a TLS port gets no answer.
    with pytest.raises(ValueError, match='no TF Serving answered'):
      sh.check_serving_model(server.address, timeout_secs=1)


# --- RunInference + KeyedModelHandler in a TestPipeline -----------------------------------------

def run_pipeline(handler: sh.ServingGrpcHandler, batch: list[np.ndarray],
                 expected: list[tuple[str, str]]) -> dict[str, int]:
  """Runs keyed images through RunInference, asserts (name, version or reason) once per image.

  Returns the job's counters.
  """
  keyed = [(f'chip_{i}', image) for i, image in enumerate(batch)]

  def outcome(element):
    name, result = element
    if isinstance(result.inference, InputRefused):
      assert result.model_id is None
      return name, str(result.inference.reason)
    assert result.model_id == f'{schema.MODEL_NAME}/{result.inference["model_version"]}'
    return name, result.inference['model_version']

  pipeline = test_pipeline.TestPipeline()
  outcomes = (pipeline | beam.Create(keyed, reshuffle=False)
              | RunInference(KeyedModelHandler(handler)) | beam.Map(outcome))
  # equal_to compares as multisets: a duplicate or a lost image fails it.
  assert_that(outcomes, equal_to(expected))
  result = pipeline.run()
  result.wait_until_finish()
  return progress.query_counters(result)


def test_pipeline_predicts_every_image_once(server):
  batch = images(30)
  handler = sh.ServingGrpcHandler(server.address, max_batch_size=8, max_images_per_request=4)

  counters = run_pipeline(handler, batch, [(f'chip_{i}', '1') for i in range(30)])

  assert counters['grpc_predicted_images'] == 30
  assert counters['grpc_unavailable_images'] == counters['grpc_failed_images'] == 0
  assert counters['grpc_retries'] == 0


def test_pipeline_with_30_percent_unavailable(local_server):
  local_server.set_faults(Faults(failure_fraction=0.3, seed=7))
  handler = sh.ServingGrpcHandler(local_server.address, min_batch_size=8, max_batch_size=8,
                                  max_images_per_request=2, **FAST)

  counters = run_pipeline(handler, images(40), [(f'chip_{i}', '1') for i in range(40)])

  assert counters['grpc_predicted_images'] == 40
  assert counters['grpc_retries'] > 0
  assert counters['grpc_requests'] == counters['grpc_retries'] + 20
  assert counters['grpc_requests'] == len(local_server.predict_request_bytes)
  assert counters.get('grpc_unavailable_images', 0) == 0


def test_pipeline_with_the_server_gone(local_server):
  address = local_server.address
  local_server.stop()
  handler = sh.ServingGrpcHandler(address, max_batch_size=4, retry_budget_secs=0.5, **FAST)

  counters = run_pipeline(handler, images(10), [(f'chip_{i}', 'UNAVAILABLE') for i in range(10)])

  assert counters['grpc_unavailable_images'] == 10
  assert counters.get('grpc_predicted_images', 0) + counters['grpc_unavailable_images'] + (
      counters.get('grpc_failed_images', 0)) == 10
  assert counters['grpc_requests'] > counters['grpc_retries'] > 0
