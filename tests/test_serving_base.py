"""The TF Serving handler's rules over any transport, and each transport's own part (no server).

`ServingHandler` and `check_served_model` are run over a scripted `Transport`: the rows, the
image-by-image resend, the retries, an unusable answer and the start-up messages are the base's,
once for both protocols. The gRPC and REST transports are then checked for their own part:
encoding images, reading answers into arrays, and what their failures mean.
"""
import json

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import predict_pb2

from beam_jobs.common import metrics
from beam_jobs.predict.backends import tf_serving
from beam_jobs.predict.backends import tf_serving_rest
from beam_jobs.predict.backends.retry_policy import CallFailed
from beam_jobs.predict.backends.serving_base import ServingHandler
from beam_jobs.predict.backends.serving_check import check_served_model
from beam_jobs.predict.backends.transport import ServedModel, Transport
from model import schema
from model.errors import InputRefused, Reason
from model.serving.protocol import tensor_as_proto_field

FAST = dict(initial_backoff_secs=0.01, max_backoff_secs=0.01, throttle_delay_secs=0.01)


def images(count: int, seed: int = 0) -> list[np.ndarray]:
  return list(np.random.default_rng(seed).integers(0, 256, (count, 8, 8, 3), dtype=np.uint8))


class _Connection:
  def close(self) -> None:
    pass


class ScriptedTransport(Transport):
  """Answers each request with the mean pixel as every output, from version 7; `script` may
  replace an attempt's answer by a failure, or the answer's outputs by other arrays."""
  name = 'scripted'
  address = 'scripted:1'

  def __init__(self, script=None, status=None):
    self.script = list(script or [])
    self.status = status or {}
    self.sent: list[int] = []

  def connect(self, max_requests_in_flight):
    return _Connection()

  def encode(self, images, model):
    return np.stack(images)

  def payload_bytes(self, payload):
    return payload.nbytes

  def send(self, connection, payload, model, timeout_secs):
    self.sent.append(len(payload))
    step = self.script.pop(0) if self.script else None
    if isinstance(step, CallFailed):
      raise step
    means = payload.reshape(len(payload), -1).mean(axis=1).astype(np.float32)[:, None]
    return step or {schema.OUTPUT_WEATHER: np.repeat(means, schema.NUM_WEATHER, axis=1),
                    schema.OUTPUT_GROUND: np.repeat(means, schema.NUM_GROUND, axis=1)}

  def decode(self, answer):
    return 7, answer

  def metadata(self, connection, model, timeout_secs):
    failure = self.status.get('metadata')
    if failure:
      raise failure
    return model.name, 7, self.status.get('signatures')

  def versions(self, connection, model_name, timeout_secs):
    return {7: 'AVAILABLE', 6: 'END'}

  def failure_text(self, failure):
    return f'<{failure.details}>'

  def unanswered_message(self, failure, timeout_secs):
    return f'nobody at {self.address}: {failure.details}'


def run(handler: ServingHandler, batch):
  client = handler.load_model()
  try:
    return list(handler.run_inference(batch, client))
  finally:
    client.close()


class _Counter:
  def __init__(self, counts, name):
    self.counts, self.name = counts, name

  def inc(self, n=1):
    self.counts[self.name] = self.counts.get(self.name, 0) + n


def test_rows_name_the_version_that_answered_and_are_counted_under_the_transports_name(
    monkeypatch):
  counts = {}
  monkeypatch.setattr(metrics, 'counter', lambda name: _Counter(counts, name))
  batch = images(5)
  transport = ScriptedTransport()
  results = run(ServingHandler(transport, max_images_per_request=2, **FAST), batch)
  assert sorted(transport.sent) == [1, 2, 2]   # the requests run on threads
  for image, result in zip(batch, results):
    assert result.example is image and result.model_id == f'{schema.MODEL_NAME}/7'
    assert result.inference['model_version'] == '7'
    assert result.inference[schema.OUTPUT_GROUND].dtype == np.float32
    np.testing.assert_allclose(result.inference[schema.OUTPUT_WEATHER], [image.mean()] * 4,
                               rtol=1e-6)
  assert counts['scripted_requests'] == 3 and counts['scripted_predicted_images'] == 5


def test_a_transient_failure_is_retried_and_a_refusal_resent_image_by_image():
  transport = ScriptedTransport([
      CallFailed(grpc.StatusCode.UNAVAILABLE, 'away', answered=False),
      CallFailed(grpc.StatusCode.INVALID_ARGUMENT, 'one image is bad'),
      None,
      CallFailed(grpc.StatusCode.INVALID_ARGUMENT, 'this one')])
  results = run(ServingHandler(transport, **FAST), images(2))
  assert transport.sent == [2, 2, 1, 1]
  assert results[0].inference['model_version'] == '7'
  assert results[1].inference.reason == Reason.INFERENCE_FAILED
  assert results[1].inference.message == 'scripted:1: INVALID_ARGUMENT: this one'


def test_a_refusal_about_the_model_is_not_resent_per_image():
  transport = ScriptedTransport([CallFailed(grpc.StatusCode.NOT_FOUND, 'no such version')])
  results = run(ServingHandler(transport, **FAST), images(3))
  assert transport.sent == [3]
  assert {r.inference.message for r in results} == {'scripted:1: NOT_FOUND: no such version'}


def test_an_answer_of_the_wrong_shape_is_unusable_for_its_whole_request():
  wrong = {schema.OUTPUT_WEATHER: np.zeros((2, 4)), schema.OUTPUT_GROUND: np.zeros((2, 12))}
  results = run(ServingHandler(ScriptedTransport([wrong]), **FAST), images(2))
  assert all(isinstance(r.inference, InputRefused) for r in results)
  assert results[0].inference.message == (
      "scripted:1: unusable answer: output 'ground' has shape [2, 12], expected [2, 13]")


def test_a_server_away_past_the_budget_leaves_its_images_unavailable():
  away = [CallFailed(grpc.StatusCode.UNAVAILABLE, 'away', answered=False)] * 100
  results = run(ServingHandler(ScriptedTransport(away), retry_budget_secs=0.05, **FAST),
                images(2))
  assert {r.inference.reason for r in results} == {Reason.UNAVAILABLE}
  assert results[0].inference.message.startswith('scripted:1: UNAVAILABLE after ')


def test_the_start_up_check_says_what_is_served_and_who_answered():
  signatures = get_model_metadata_pb2.SignatureDefMap()
  no_signatures = ScriptedTransport(status={'signatures': None})
  with pytest.raises(ValueError, match=r'^scripted:1 sent no signature_def metadata for '
                                       r'PlanetModel label stable$'):
    check_served_model(no_signatures, model_version_label='stable')
  with pytest.raises(ValueError, match=r'^scripted:1 answered with version 7; expected 3$'):
    check_served_model(ScriptedTransport(status={'signatures': signatures}), model_version=3)
  for failure, said in [
      (CallFailed(grpc.StatusCode.NOT_FOUND, 'gone'),
       "scripted:1 does not serve PlanetModel version 3 (gone); for model 'PlanetModel' it has "
       'versions 7 (AVAILABLE), 6 (END)'),
      (CallFailed(grpc.StatusCode.UNAVAILABLE, 'refused', answered=False),
       'nobody at scripted:1: refused'),
      (CallFailed(grpc.StatusCode.UNAVAILABLE, 'shutting down'),
       'scripted:1 refused the metadata request for PlanetModel version 3: <shutting down>')]:
    with pytest.raises(ValueError) as refused:
      check_served_model(ScriptedTransport(status={'metadata': failure}), model_version=3)
    assert str(refused.value) == said
  with pytest.raises(ValueError, match='ask for a version .3. or a version label'):
    check_served_model(ScriptedTransport(), model_version=3, model_version_label='stable')


def test_rest_writes_json_from_the_arrays_and_reads_the_answer_into_arrays():
  transport = tf_serving_rest.RestTransport('localhost:8501')
  batch = images(2)
  body = transport.encode(batch, ServedModel(signature='serving_tta'))
  assert transport.payload_bytes(body) == len(body)
  sent = json.loads(body)
  assert sent['signature_name'] == 'serving_tta'
  np.testing.assert_array_equal(np.array(sent['inputs']['images'], np.uint8), np.stack(batch))
  answer = json.dumps({'outputs': {'weather': [[0.25] * 4], 'ground': [[0.5] * 13],
                                   'extra': [1]}}).encode()
  version, outputs = transport.decode((4, answer))
  assert version == 4 and set(outputs) == {'weather', 'ground'}
  assert outputs['ground'].dtype == np.float32 and outputs['ground'].shape == (1, 13)
  with pytest.raises(ValueError, match="the answer has outputs \\['weather'\\]"):
    transport.decode((4, b'{"outputs": {"weather": [[1, 2, 3, 4]]}}'))
  assert transport.image_bytes_within(256 + 5 * 1000) == 1000


def test_rest_failures_say_whether_a_server_answered():
  connection = tf_serving_rest.RestTransport('127.0.0.1:9').connect(1)   # the discard port
  try:
    with pytest.raises(CallFailed) as failed:
      connection.call('GET', '/v1/models/PlanetModel', 1.0)
  finally:
    connection.close()
  assert failed.value.code == grpc.StatusCode.UNAVAILABLE and not failed.value.answered
  assert failed.value.details.startswith('connection failed: ')


def test_grpc_reads_the_answers_tensors_and_refuses_one_without_an_output():
  transport = tf_serving.GrpcTransport('localhost:8500')
  request = transport.encode(images(2), ServedModel(version=3))
  assert transport.payload_bytes(request) == request.ByteSize()
  assert request.model_spec.version.value == 3
  response = predict_pb2.PredictResponse()
  response.model_spec.version.value = 3
  outputs = response.outputs
  outputs[schema.OUTPUT_WEATHER].CopyFrom(tensor_as_proto_field(np.ones((2, 4), np.float32)))
  with pytest.raises(ValueError,
                     match=r"the answer has no output 'ground' \(it has \['weather'\]\)"):
    transport.decode(response)
  outputs[schema.OUTPUT_GROUND].CopyFrom(tensor_as_proto_field(np.ones((2, 13), np.float32)))
  version, outputs = transport.decode(response)
  assert version == 3 and outputs[schema.OUTPUT_GROUND].shape == (2, 13)
