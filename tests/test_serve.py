"""The local TF Serving-compatible server: answers, status codes, version folders, faults, restarts.

The gRPC tests also run against the real `tensorflow_model_server` where it is on the PATH.
"""
import os
import re
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from model import schema
from model.export import export_model
from model.export import list_versions
from model.network import build_model
from model.saved_model_info import incomplete_reason
from model.serving.faults import Faults
from model.serving.local_server import LocalServingServer
from model.serving.model_server import ModelServerProcess
from tests.conftest import make_export_base

IMAGE_SIZE = 32
REAL_SERVER = shutil.which('tensorflow_model_server')
BACKENDS = [
    'local',
    pytest.param('tensorflow_model_server', marks=pytest.mark.skipif(
        REAL_SERVER is None, reason='tensorflow_model_server is not on the PATH')),
]
_State = get_model_status_pb2.ModelVersionStatus.State


def start_backend(kind: str, base_path: str):
  server = (LocalServingServer(base_path) if kind == 'local'
            else ModelServerProcess(base_path))
  server.start()
  return server


@pytest.fixture(scope='module')
def export_base(tmp_path_factory):
  """This module's own export (its tests add versions), at IMAGE_SIZE."""
  return make_export_base(tmp_path_factory, IMAGE_SIZE)


@pytest.fixture(scope='module', params=BACKENDS)
def server(request, export_base):
  running = start_backend(request.param, str(export_base / schema.MODEL_NAME))
  yield running
  running.stop()


@pytest.fixture(scope='module')
def local_server(export_base):
  with LocalServingServer(str(export_base / schema.MODEL_NAME)) as running:
    yield running


def stubs(address: str):
  channel = grpc.insecure_channel(address)
  return (prediction_service_pb2_grpc.PredictionServiceStub(channel),
          model_service_pb2_grpc.ModelServiceStub(channel))


def images(count: int, size: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def predict_request(inputs: dict, name: str = schema.MODEL_NAME, version: int | None = None,
                    signature: str = '') -> predict_pb2.PredictRequest:
  request = predict_pb2.PredictRequest()
  request.model_spec.name = name
  request.model_spec.signature_name = signature
  if version is not None:
    request.model_spec.version.value = version
  for alias, array in inputs.items():
    request.inputs[alias].CopyFrom(tf.make_tensor_proto(array))
  return request


def rpc_error(call, request) -> grpc.RpcError:
  with pytest.raises(grpc.RpcError) as raised:
    call(request, timeout=10)
  return raised.value


# --- Version folders (no server) ----------------------------------------------------------------

def test_list_versions_skip_temporary_and_other_names(tmp_path):
  for name in ['1', '2', '10', '.tmp-3-ab12cd34', 'abc', '4.bak', '-5']:
    (tmp_path / name).mkdir()
  assert list_versions(str(tmp_path)) == [1, 2, 10]
  assert list_versions(str(tmp_path / 'missing')) == []


def test_incomplete_reason_checks_saved_model_and_checksums(tmp_path, export_base):
  complete = export_base / schema.MODEL_NAME / '1'
  assert incomplete_reason(str(complete)) is None
  assert incomplete_reason(str(tmp_path)) == 'no saved_model.pb'

  truncated = tmp_path / 'truncated'
  shutil.copytree(complete, truncated)
  variables = next((truncated / 'variables').glob('variables.data-*'))
  variables.write_bytes(variables.read_bytes()[:-100])
  assert 'does not match its checksum' in incomplete_reason(str(truncated))

  missing = tmp_path / 'missing'
  shutil.copytree(complete, missing)
  (missing / 'variables' / 'variables.index').unlink()
  assert incomplete_reason(str(missing)) == 'variables/variables.index is missing'


# --- The gRPC API, local and real -------------------------------------------------------------

def test_predict_matches_the_saved_model(server, export_base):
  prediction, _ = stubs(server.address)
  loaded = tf.saved_model.load(str(export_base / schema.MODEL_NAME / '1'))
  batch = images(7)

  response = prediction.Predict(predict_request({schema.INPUT_IMAGES: batch}), timeout=30)

  expected = loaded.signatures[schema.SERVING_SIGNATURE](images=tf.constant(batch))
  for name in schema.OUTPUT_NAMES:
    got = tf.make_ndarray(response.outputs[name])
    assert got.shape == expected[name].shape
    assert np.max(np.abs(got - expected[name].numpy())) < 1e-6
  assert response.model_spec.name == schema.MODEL_NAME
  assert response.model_spec.version.value == 1
  assert response.model_spec.signature_name == schema.SERVING_SIGNATURE


def test_predict_float_signature(server, export_base):
  prediction, _ = stubs(server.address)
  loaded = tf.saved_model.load(str(export_base / schema.MODEL_NAME / '1'))
  batch = images(3).astype(np.float32) / 255.0

  response = prediction.Predict(predict_request({schema.INPUT_FLOAT: batch},
                                                signature=schema.FLOAT_SIGNATURE), timeout=30)

  expected = loaded.signatures[schema.FLOAT_SIGNATURE](input_image=tf.constant(batch))
  assert np.max(np.abs(tf.make_ndarray(response.outputs[schema.OUTPUT_GROUND]) -
                       expected[schema.OUTPUT_GROUND].numpy())) < 1e-6
  assert response.model_spec.signature_name == schema.FLOAT_SIGNATURE


def test_metadata_shows_both_signatures(server):
  prediction, _ = stubs(server.address)
  request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=['signature_def'])
  request.model_spec.name = schema.MODEL_NAME

  response = prediction.GetModelMetadata(request, timeout=10)

  signatures = get_model_metadata_pb2.SignatureDefMap()
  assert response.metadata['signature_def'].Unpack(signatures)
  assert {schema.SERVING_SIGNATURE, schema.FLOAT_SIGNATURE} <= set(signatures.signature_def)
  images_input = signatures.signature_def[schema.SERVING_SIGNATURE].inputs[schema.INPUT_IMAGES]
  assert images_input.dtype == tf.uint8.as_datatype_enum
  assert [d.size for d in images_input.tensor_shape.dim] == [-1, IMAGE_SIZE, IMAGE_SIZE, 3]
  float_input = signatures.signature_def[schema.FLOAT_SIGNATURE].inputs[schema.INPUT_FLOAT]
  assert float_input.dtype == tf.float32.as_datatype_enum
  assert set(signatures.signature_def[schema.SERVING_SIGNATURE].outputs) == set(schema.OUTPUT_NAMES)
  assert response.model_spec.name == schema.MODEL_NAME
  assert response.model_spec.version.value == 1


def test_model_status_available(server):
  _, model = stubs(server.address)
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = schema.MODEL_NAME

  (status,) = model.GetModelStatus(request, timeout=10).model_version_status

  assert (status.version, status.state, status.status.error_code) == (1, _State.AVAILABLE, 0)
  request.model_spec.version.value = 9
  assert rpc_error(model.GetModelStatus, request).code() == grpc.StatusCode.NOT_FOUND
  request.model_spec.name = 'Other'
  request.model_spec.ClearField('version')
  assert rpc_error(model.GetModelStatus, request).code() == grpc.StatusCode.NOT_FOUND


GOOD = {schema.INPUT_IMAGES: images(2)}
STATUS_CASES = {
    # name: (request, code, TF Serving's message, checked against the local server)
    'unknown model': (predict_request(GOOD, name='Other'), grpc.StatusCode.NOT_FOUND,
                      'Servable not found for request: Latest(Other)'),
    'unknown version': (predict_request(GOOD, version=7), grpc.StatusCode.NOT_FOUND,
                        f'Servable not found for request: Specific({schema.MODEL_NAME}, 7)'),
    # TF Serving's predict_util.cc answers an unknown signature with FAILED_PRECONDITION.
    'unknown signature': (predict_request(GOOD, signature='nope'),
                          grpc.StatusCode.FAILED_PRECONDITION,
                          'Serving signature key "nope" not found.'),
    'wrong input name': (predict_request({'pixels': images(2)}), grpc.StatusCode.INVALID_ARGUMENT,
                         'Signature input alias: images(feed name: serving_default_images:0) '
                         'not found in request'),
    'extra input': (predict_request({**GOOD, 'extra': images(2)}),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    'input size does not match signature: 2!=1 len({extra,images}) != '
                    'len({images}). Sent extra: {extra}. Missing but required: {}.'),
    'wrong dtype': (predict_request({schema.INPUT_IMAGES: images(2).astype(np.float32)}),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    'Expects arg[0] to be uint8 but float32 is provided'),
    # TF Serving feeds a tensor as sent, whatever the signature's shape: the model's own ops
    # refuse it (here its Flatten's Reshape), INVALID_ARGUMENT from TensorFlow.
    'wrong image size': (predict_request({schema.INPUT_IMAGES: images(2, size=24)}),
                         grpc.StatusCode.INVALID_ARGUMENT, 'Input to reshape is a tensor with'),
    # The local server's one shape check (TF's oneDNN convolution aborts on a wrong rank).
    'wrong rank': (predict_request({schema.INPUT_IMAGES: images(1)[0]}),
                   grpc.StatusCode.INVALID_ARGUMENT,
                   'input images must be 4-dimensional, got shape [32,32,3]'),
}


@pytest.mark.parametrize('case', sorted(STATUS_CASES))
def test_predict_status_codes(server, case):
  request, code, message = STATUS_CASES[case]
  prediction, _ = stubs(server.address)

  error = rpc_error(prediction.Predict, request)

  assert error.code() == code
  if isinstance(server, LocalServingServer):
    assert message in error.details()


def test_metadata_status_codes(server):
  prediction, _ = stubs(server.address)
  request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=['signature_def'])
  request.model_spec.name = 'Other'
  assert rpc_error(prediction.GetModelMetadata, request).code() == grpc.StatusCode.NOT_FOUND
  request.model_spec.name = schema.MODEL_NAME
  request.model_spec.version.value = 5
  assert rpc_error(prediction.GetModelMetadata, request).code() == grpc.StatusCode.NOT_FOUND
  request.ClearField('metadata_field')
  request.model_spec.ClearField('version')
  error = rpc_error(prediction.GetModelMetadata, request)
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert 'at least one metadata_field' in error.details()


@pytest.mark.parametrize('kind', BACKENDS)
@pytest.mark.slow
def test_picks_up_a_new_version_and_never_a_temporary_or_partial_folder(kind, tmp_path):
  export_model(build_model(IMAGE_SIZE), str(tmp_path))
  base = tmp_path / schema.MODEL_NAME
  server = start_backend(kind, str(base))
  prediction, model = stubs(server.address)
  request = predict_request({schema.INPUT_IMAGES: images(1)})
  try:
    # An export still being written, under its temporary name.
    shutil.copytree(base / '1', base / '.tmp-2-0123abcd')
    if kind == 'local':
      # A numbered copy whose last bytes have not landed: its checksums say so.
      shutil.copytree(base / '1', base / '3')
      variables = next((base / '3' / 'variables').glob('variables.data-*'))
      variables.write_bytes(variables.read_bytes()[:-64])
    time.sleep(2.5)  # more than two polls
    assert prediction.Predict(request, timeout=10).model_spec.version.value == 1

    shutil.rmtree(base / '.tmp-2-0123abcd')
    new_version = int(os.path.basename(export_model(build_model(IMAGE_SIZE), str(tmp_path))))
    deadline = time.monotonic() + 15
    while prediction.Predict(request, timeout=10).model_spec.version.value != new_version:
      assert time.monotonic() < deadline, f'version {new_version} was not picked up'
      time.sleep(0.2)

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = schema.MODEL_NAME
    states = {s.version: s.state
              for s in model.GetModelStatus(status_request, timeout=10).model_version_status}
    assert states[new_version] == _State.AVAILABLE
    if kind == 'local':
      assert states == {new_version: _State.AVAILABLE, 1: _State.END}
    old = predict_request({schema.INPUT_IMAGES: images(1)}, version=1)
    deadline = time.monotonic() + 15
    while True:  # the real server lets the old version go a moment after the new one is up
      try:
        prediction.Predict(old, timeout=10)
      except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        break
      assert time.monotonic() < deadline
      time.sleep(0.2)
  finally:
    server.stop()


# --- Local server only: message size, faults, restarts, the command (TLS: test_serving_handler) ---

def test_requests_over_4_mib_are_refused(local_server):
  prediction, _ = stubs(local_server.address)
  # 1,400 chips of 32x32x3 = 4.3 MB: over gRPC's default limit.
  error = rpc_error(prediction.Predict, predict_request({schema.INPUT_IMAGES: images(1400)}))
  assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
  assert 'larger than max' in error.details()
  response = prediction.Predict(predict_request({schema.INPUT_IMAGES: images(1300)}), timeout=30)
  assert tf.make_ndarray(response.outputs[schema.OUTPUT_WEATHER]).shape == (1300, 4)


def fault_codes(server: LocalServingServer, calls: int) -> list[str]:
  prediction, _ = stubs(server.address)
  codes = []
  for _ in range(calls):
    try:
      prediction.Predict(predict_request({schema.INPUT_IMAGES: images(1)}), timeout=10)
      codes.append('OK')
    except grpc.RpcError as error:
      codes.append(error.code().name)
  return codes


def test_injected_failures_are_a_seeded_share(local_server):
  try:
    local_server.set_faults(Faults(failure_fraction=0.3, seed=11))
    first = fault_codes(local_server, 60)
    local_server.set_faults(Faults(failure_fraction=0.3, seed=11))
    again = fault_codes(local_server, 60)
    local_server.set_faults(Faults(failure_fraction=0.5, seed=3,
                                         failure_code=grpc.StatusCode.RESOURCE_EXHAUSTED))
    exhausted = fault_codes(local_server, 20)
  finally:
    local_server.set_faults(Faults())

  assert first == again
  assert set(first) == {'OK', 'UNAVAILABLE'}
  assert 10 <= first.count('UNAVAILABLE') <= 26
  assert set(exhausted) == {'OK', 'RESOURCE_EXHAUSTED'}


def test_injected_latency_and_refused_images(local_server):
  prediction, _ = stubs(local_server.address)
  batch = images(4)
  batch[2, 0, 0] = (255, 0, 255)
  try:
    local_server.set_faults(Faults(
        latency_secs=0.3, refuse_image=lambda image: tuple(image[0, 0]) == (255, 0, 255)))
    started = time.monotonic()
    error = rpc_error(prediction.Predict, predict_request({schema.INPUT_IMAGES: batch}))
    assert time.monotonic() - started >= 0.3
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'image 2 refused' in error.details()
    prediction.Predict(predict_request({schema.INPUT_IMAGES: batch[:2]}), timeout=10)
  finally:
    local_server.set_faults(Faults())


def test_stop_and_restart_on_the_same_port(export_base):
  server = LocalServingServer(str(export_base / schema.MODEL_NAME))
  port = server.start()
  prediction, _ = stubs(server.address)
  request = predict_request({schema.INPUT_IMAGES: images(1)})
  try:
    server.stop()
    assert rpc_error(prediction.Predict, request).code() == grpc.StatusCode.UNAVAILABLE
    assert server.start() == port
    response = prediction.Predict(request, timeout=10, wait_for_ready=True)
    assert response.model_spec.version.value == 1
  finally:
    server.stop()
  assert server.predict_request_bytes == [request.ByteSize()]  # the refused call never arrived


@pytest.mark.slow
def test_command_line(export_base):
  process = subprocess.Popen(
      [sys.executable, '-m', 'model.serve', '--model_base_path',
       str(export_base / schema.MODEL_NAME), '--port', '0'],
      stderr=subprocess.PIPE, text=True, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'},
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    for line in process.stderr:
      found = re.search(r'listening on (127\.0\.0\.1:\d+)', line)
      if found:
        break
    else:
      pytest.fail('the server never said where it listens')
    prediction, _ = stubs(found.group(1))
    response = prediction.Predict(predict_request({schema.INPUT_IMAGES: images(2)}), timeout=10)
    assert response.model_spec.version.value == 1
  finally:
    process.terminate()
    process.wait(timeout=10)
