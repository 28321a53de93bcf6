"""TF Serving's REST API: the local server, the tutorial's client, `predict --serving_protocol rest`.

Layers: the wire rules (no server) -> the REST API of `LocalServingServer` (and of the real
`tensorflow_model_server` where it is on the PATH) with `requests` and `curl` -> the REST handler
against it, faults injected -> the prediction command, against in-process and gRPC, through faults
and a restart. Images are 32 px to stay fast.
"""
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import grpc
import keras
import numpy as np
import orjson
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from beam_jobs import make_sample, predict
from beam_jobs.common import progress
from beam_jobs.predict.backends import retry_policy
from beam_jobs.predict.backends import serving_address
from beam_jobs.predict.backends import tf_serving as grpc_backend
from beam_jobs.predict.backends import tf_serving_rest as rest
from model import schema
from model.errors import InputRefused, Reason
from model.export import export_model
from model.network import build_model
from model.serving import rest_arrays
from model.serving import rest_protocol
from model.serving.faults import Faults
from model.serving.local_server import LocalServingServer
from model.serving.model_server import ModelServerProcess
from tests.conftest import REPO, make_export_base, read_jsonl, restarted_mid_job
from tests.test_reliability_serving import link_copies, pipeline_results  # pylint: disable=unused-import
from tests.test_serving_handler import make_self_signed_certificate

IMAGE_SIZE = 32
REAL_SERVER = shutil.which('tensorflow_model_server')
BACKENDS = ['local', pytest.param('tensorflow_model_server', marks=pytest.mark.skipif(
    REAL_SERVER is None, reason='tensorflow_model_server is not on the PATH'))]
PREDICT = f'/v1/models/{schema.MODEL_NAME}:predict'
PREDICTIONS = f'{schema.PREDICTIONS_PREFIX}-*.jsonl'
FAST = dict(initial_backoff_secs=0.05, max_backoff_secs=0.5, throttle_delay_secs=0.2)


def pixels(count: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE, 3),
                                              dtype=np.uint8)


@pytest.fixture(scope='module')
def export_base(tmp_path_factory):
  """This module's own export (a test adds a version to its own copy), at IMAGE_SIZE."""
  return make_export_base(tmp_path_factory, IMAGE_SIZE)


@pytest.fixture(scope='module')
def model_dir(export_base) -> str:
  return str(export_base / schema.MODEL_NAME)


@pytest.fixture(scope='module')
def saved_model(model_dir):
  return tf.saved_model.load(os.path.join(model_dir, '1'))


@pytest.fixture(scope='module', params=BACKENDS)
def server(request, model_dir):
  running = (LocalServingServer(model_dir, rest_api_port=0) if request.param == 'local'
             else ModelServerProcess(model_dir, rest_api_port=0))
  running.start()
  yield running
  running.stop()


@pytest.fixture
def local_server(model_dir):
  """A local server of its own, for tests that inject faults."""
  with LocalServingServer(model_dir, rest_api_port=0) as running:
    yield running


@pytest.fixture(scope='module')
def chips(tmp_path_factory):
  """24 generated chips (256 px JPEGs, one in ten CMYK): (folder, {name: tags})."""
  out = tmp_path_factory.mktemp('rest_chips')
  rows = make_sample.make_sample(str(out), count=24, seed=11, prefix='chip')
  return out / 'train-jpg', dict(rows)


def url(server, path: str) -> str:
  return f'http://{server.rest_address}{path}'


def expected(saved_model, signature: str, **inputs) -> dict[str, np.ndarray]:
  outputs = saved_model.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
  return {name: outputs[name].numpy() for name in schema.OUTPUT_NAMES}


def assert_close(got: dict, want: dict, tolerance: float = 1e-5) -> float:
  """Both heads within `tolerance`; returns the largest difference."""
  largest = 0.0
  for name in schema.OUTPUT_NAMES:
    got_array = np.asarray(got[name], dtype=np.float32)
    assert got_array.shape == want[name].shape, name
    largest = max(largest, float(np.abs(got_array - want[name]).max()))
  assert largest <= tolerance
  return largest


# --- The wire rules (no server) -------------------------------------------------------------------

def test_http_statuses_are_tf_servings_and_read_back_for_retries():
  codes = rest_protocol.HTTP_STATUS_BY_CODE
  assert (codes[grpc.StatusCode.NOT_FOUND], codes[grpc.StatusCode.INVALID_ARGUMENT],
          codes[grpc.StatusCode.FAILED_PRECONDITION], codes[grpc.StatusCode.UNAVAILABLE],
          codes[grpc.StatusCode.RESOURCE_EXHAUSTED], codes[grpc.StatusCode.DEADLINE_EXCEEDED],
          codes[grpc.StatusCode.INTERNAL]) == (404, 400, 400, 503, 429, 504, 500)
  transient = {status for status in (200, 400, 404, 413, 429, 500, 501, 502, 503, 504)
               if retry_policy.is_transient(rest_protocol.code_of_http_status(status))}
  assert transient == {429, 502, 503, 504}
  assert rest_protocol.predict_path('Planet Model', 3) == '/v1/models/Planet%20Model/versions/3:predict'
  assert rest_protocol.base_url('[::1]:8501', use_tls=True) == 'https://[::1]:8501'


def test_plain_http_only_to_loopback_unless_allowed():
  rest.check_rest_transport('localhost:8501')
  rest.check_rest_transport('10.0.0.7:8501', use_tls=True)
  rest.check_rest_transport('10.0.0.7:8501', allow_insecure=True)
  with pytest.raises(ValueError, match='refusing plain HTTP to 10.0.0.7.*--tls.*--allow_insecure'):
    rest.check_rest_transport('10.0.0.7:8501')
  with pytest.raises(ValueError, match='refusing plain HTTP'):
    rest.ServingRestHandler('tfserving:8501')
  with pytest.raises(ValueError, match='contradict'):
    rest.check_rest_transport('localhost:8501', use_tls=True, allow_insecure=True)


def test_big_numeric_arrays_are_read_by_numpy_as_a_json_parser_reads_them():
  rng = np.random.default_rng(0)
  for array in (rng.integers(0, 256, (6, 40, 40, 3)), rng.random((2, 50, 50, 3)).astype(np.float32),
                rng.normal(size=(4, 3000)) * 1e-30, -rng.integers(0, 10**17, (9000,))):
    body = orjson.dumps({'signature_name': 'x', 'inputs': {'a': array, 'b': [1, 2]}},
                        option=orjson.OPT_SERIALIZE_NUMPY)
    doc = rest_arrays.loads(body)
    assert isinstance(doc['inputs']['a'], rest_arrays.NumericSpan) and doc['inputs']['b'] == [1, 2]
    read = doc['inputs']['a'].array()
    assert read.dtype.kind == array.dtype.kind and read.shape == array.shape
    np.testing.assert_array_equal(read, np.array(orjson.loads(body)['inputs']['a']))
  spaced = json.dumps({'inputs': [[1, 2, 3]] * 20000}, indent=2).encode()
  assert rest_arrays.loads(spaced)['inputs'].array().shape == (20000, 3)
  # Anything but a rectangle of numbers is left to the checked reader, with TF Serving's messages.
  ragged = rest_arrays.loads(json.dumps({'inputs': [[1, 2, 3]] * 20000 + [[1, 2]]}).encode())
  past_int64 = rest_arrays.loads(b'{"inputs": [' + b'1,' * 40000 + b'12345678901234567890]}')
  assert ragged['inputs'].array() is None and past_int64['inputs'].array() is None
  assert past_int64['inputs'].value()[-1] == 12345678901234567890
  in_a_string = b'{"signature_name": "[' + b'1,' * 40000 + b'1]", "inputs": [1]}'
  assert rest_arrays.loads(in_a_string)['signature_name'].startswith('[1,1,')


# --- The REST API: the tutorial's client, columnar requests, curl ---------------------------------

def test_the_tutorials_client_gets_the_grpc_and_in_process_answers(server, saved_model, chips):
  chips_dir, _ = chips
  # The tutorial's client, word for word but for the signature: its model took input_image by
  # default; this export's default takes uint8 pixels, its predict_float the tutorial's floats.
  image = keras.utils.img_to_array(keras.utils.load_img(
      str(chips_dir / 'chip_0.jpg'), target_size=(IMAGE_SIZE, IMAGE_SIZE))) / 255.
  payload = {'signature_name': 'predict_float', 'instances': [{'input_image': image.tolist()}]}
  answer = requests.post(url(server, PREDICT), json=payload, timeout=30).json()

  (prediction,) = answer['predictions']
  assert sorted(prediction) == ['ground', 'weather']
  want = expected(saved_model, schema.FLOAT_SIGNATURE, input_image=image[None])
  rest_gap = assert_close({k: [v] for k, v in prediction.items()}, want)
  request = predict_pb2.PredictRequest()
  request.model_spec.name = schema.MODEL_NAME
  request.model_spec.signature_name = schema.FLOAT_SIGNATURE
  request.inputs[schema.INPUT_FLOAT].CopyFrom(tf.make_tensor_proto(image[None]))
  with grpc.insecure_channel(server.address) as channel:
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, 30)
  from_grpc = {name: tf.make_ndarray(response.outputs[name]) for name in schema.OUTPUT_NAMES}
  assert_close({k: np.array([v]) for k, v in prediction.items()}, from_grpc)
  print(f'\ntutorial client: REST vs in-process largest difference {rest_gap:.1e}')


def test_columnar_and_row_requests_of_uint8_pixels(server, saved_model):
  batch = pixels(3)
  want = expected(saved_model, schema.SERVING_SIGNATURE, images=batch)

  columnar = requests.post(url(server, PREDICT), timeout=30,
                           json={'inputs': {schema.INPUT_IMAGES: batch.tolist()}}).json()
  rows = requests.post(url(server, f'/v1/models/{schema.MODEL_NAME}/versions/1:predict'),
                       json={'signature_name': 'serving_default', 'instances': batch.tolist()},
                       timeout=30).json()

  assert sorted(columnar) == ['outputs'] and sorted(columnar['outputs']) == ['ground', 'weather']
  assert_close(columnar['outputs'], want)
  assert len(rows['predictions']) == 3
  assert_close({name: [row[name] for row in rows['predictions']] for name in want}, want)


@pytest.mark.slow
def test_the_serve_command_answers_curl(tmp_path, model_dir, saved_model):
  ports = []
  for _ in range(2):
    with socket.socket() as probe:
      probe.bind(('127.0.0.1', 0))
      ports.append(probe.getsockname()[1])
  command = subprocess.Popen(
      [sys.executable, '-m', 'model.serve', '--model_base_path', model_dir,
       '--port', str(ports[0]), '--rest_api_port', str(ports[1])],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  base = f'http://127.0.0.1:{ports[1]}'
  try:
    give_up_at = time.monotonic() + 60
    while True:
      assert command.poll() is None, 'model.serve exited'
      try:
        if requests.get(f'{base}/v1/models/{schema.MODEL_NAME}', timeout=2).ok:
          break
      except requests.ConnectionError:
        assert time.monotonic() < give_up_at, 'model.serve did not answer within 60 s'
        time.sleep(0.2)
    batch = pixels(2, seed=3)
    (tmp_path / 'body.json').write_text(json.dumps({'instances': batch.tolist()}))
    curl = subprocess.run(
        ['curl', '-s', '-X', 'POST', '-H', 'Content-Type: application/json',
         '-d', f'@{tmp_path / "body.json"}', f'{base}{PREDICT}'],
        capture_output=True, text=True, timeout=60, check=True)
    missing = subprocess.run(['curl', '-s', '-w', ' %{http_code}', f'{base}/v1/models/Nope'],
                             capture_output=True, text=True, timeout=60, check=True)
  finally:
    command.terminate()
    command.wait(timeout=30)
  rows = json.loads(curl.stdout)['predictions']
  want = expected(saved_model, schema.SERVING_SIGNATURE, images=batch)
  assert_close({name: [row[name] for row in rows] for name in want}, want)
  body, status = missing.stdout.rsplit(' ', 1)
  assert status == '404' and json.loads(body)['error']


def test_status_and_metadata_have_tf_servings_shape(server):
  status = requests.get(url(server, f'/v1/models/{schema.MODEL_NAME}'), timeout=30).json()
  one = requests.get(url(server, f'/v1/models/{schema.MODEL_NAME}/versions/1'), timeout=30).json()
  metadata = requests.get(url(server, f'/v1/models/{schema.MODEL_NAME}/metadata'),
                          timeout=30).json()

  assert status == one == {'model_version_status': [{
      'version': '1', 'state': 'AVAILABLE', 'status': {'error_code': 'OK', 'error_message': ''}}]}
  assert metadata['model_spec'] == {'name': schema.MODEL_NAME, 'version': '1',
                                    'signature_name': ''}
  signatures = metadata['metadata']['signature_def']['signature_def']
  assert {schema.SERVING_SIGNATURE, schema.FLOAT_SIGNATURE} <= set(signatures)
  images = signatures[schema.SERVING_SIGNATURE]['inputs'][schema.INPUT_IMAGES]
  assert images['dtype'] == 'DT_UINT8'
  assert [d['size'] for d in images['tensor_shape']['dim']] == ['-1', '32', '32', '3']
  assert signatures[schema.SERVING_SIGNATURE]['method_name'] == 'tensorflow/serving/predict'
  assert sorted(signatures[schema.SERVING_SIGNATURE]['outputs']) == ['ground', 'weather']


# --- Errors: TF Serving's status and a JSON error, and the server serves on ---------------------

GOOD = {'instances': pixels(1).tolist()}
ERRORS = [
    # (what, method, path, body, status, words of the local server's message)
    ('wrong model', 'POST', '/v1/models/Nope:predict', GOOD, 404,
     'Servable not found for request: Latest(Nope)'),
    ('wrong version', 'POST', f'/v1/models/{schema.MODEL_NAME}/versions/7:predict', GOOD, 404,
     f'Servable not found for request: Specific({schema.MODEL_NAME}, 7)'),
    ('status of a wrong version', 'GET', f'/v1/models/{schema.MODEL_NAME}/versions/7', None, 404,
     f'Could not find version 7 of model {schema.MODEL_NAME}'),
    ('metadata of a wrong model', 'GET', '/v1/models/Nope/metadata', None, 404,
     'Servable not found for request: Latest(Nope)'),
    ('wrong signature', 'POST', PREDICT, {'signature_name': 'nope', **GOOD}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ('wrong input name', 'POST', PREDICT, {'instances': [{'pictures': pixels(1)[0].tolist()}]},
     400, 'does not have named input: pictures'),
    ('wrong dtype', 'POST', PREDICT, {'inputs': [[[['red', 'green', 'blue']] * 32] * 32]}, 400,
     'JSON Value: "red" Type: String is not of expected type: uint8'),
    ('floats for uint8', 'POST', PREDICT, {'inputs': (pixels(1) / 255.).tolist()}, 400,
     'is not of expected type: uint8'),
    ('wrong shape', 'POST', PREDICT, {'instances': np.zeros((1, 16, 16, 3), int).tolist()}, 400,
     'Input to reshape is a tensor with'),
    ('ragged lists', 'POST', PREDICT, {'instances': [[[[1, 2, 3]] * 32] * 31 + [[[1, 2]] * 32]]},
     400, 'Encountered list at unexpected size: 2 at level: 2 expected size: 3'),
    ('a big ragged body', 'POST', PREDICT,
     {'instances': pixels(20).tolist() + [np.zeros((32, 32, 2), int).tolist()]}, 400,
     'Expecting tensor size: 3072 but got: 2048'),
    ('a big body of floats for uint8', 'POST', PREDICT, {'inputs': (pixels(8) / 255.).tolist()},
     400, 'is not of expected type: uint8'),
    ('malformed JSON', 'POST', PREDICT, b'{"instances": [1, 2', 400, 'JSON Parse error'),
    ('a malformed number in a big array', 'POST', PREDICT,
     b'{"inputs": [' + b'1,' * 40000 + b'1-2]}', 400, 'JSON Parse error'),
    ('an empty body', 'POST', PREDICT, b'', 400, 'JSON Parse error: The document is empty'),
    ('neither instances nor inputs', 'POST', PREDICT, {'examples': []}, 400,
     "Missing 'inputs' or 'instances' key"),
    ('a malformed path', 'GET', '/v1/models/PlanetModel/versions/one', None, 400,
     'Malformed request: GET /v1/models/PlanetModel/versions/one'),
]


def _send(server, method: str, path: str, body) -> requests.Response:
  data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
  return requests.request(method, url(server, path), data=data, timeout=30,
                          headers={'Content-Type': 'application/json'})


@pytest.mark.parametrize('what,method,path,body,status,words', ERRORS, ids=[e[0] for e in ERRORS])
def test_each_error_has_tf_servings_status_and_a_json_error(server, what, method, path, body,
                                                            status, words):
  answer = _send(server, method, path, body)

  assert answer.status_code == status, (what, answer.text)
  assert isinstance(answer.json()['error'], str) and answer.json()['error']
  if isinstance(server, LocalServingServer):
    assert words in answer.json()['error']
  assert _send(server, 'POST', PREDICT, GOOD).status_code == 200   # and it serves on


def test_an_oversized_body_is_413_and_the_server_serves_on(local_server):
  too_big = b'{"instances": [' + b'0,' * (3 << 20) + b'0]}'   # 6 MiB > the 4 MiB limit

  answer = requests.post(url(local_server, PREDICT), data=too_big, timeout=30)

  assert answer.status_code == 413
  assert 'larger than this server accepts (4194304 bytes)' in answer.json()['error']
  assert _send(local_server, 'POST', PREDICT, GOOD).status_code == 200


def test_b64_strings_in_and_out(tmp_path):
  """A string input takes {"b64": ...}; an output named *_bytes is answered so."""
  class Echo(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='text_bytes')])
    def serve(self, text_bytes):
      return {'echo_bytes': text_bytes, 'length': tf.strings.length(text_bytes)}
  echo = Echo()
  tf.saved_model.save(echo, str(tmp_path / 'Echo' / '1'), signatures={'serving_default': echo.serve})
  raw = [b'\x00\xffplanet', b'chip']
  with LocalServingServer(str(tmp_path / 'Echo'), model_name='Echo', rest_api_port=0) as served:
    rows = requests.post(url(served, '/v1/models/Echo:predict'), timeout=30, json={
        'instances': [{'b64': base64.b64encode(v).decode()} for v in raw]}).json()
    columns = requests.post(url(served, '/v1/models/Echo:predict'), timeout=30,
                            json={'inputs': ['text', {'b64': 'bad base64!'}]})
  assert rows == {'predictions': [
      {'echo_bytes': {'b64': base64.b64encode(v).decode()}, 'length': len(v)} for v in raw]}
  assert columns.status_code == 400 and columns.json()['error'] == 'Unable to base64 decode'


def test_injected_faults_answer_503_and_the_server_serves_on(local_server):
  local_server.set_faults(Faults(failure_fraction=0.3, seed=1))
  statuses = [_send(local_server, 'POST', PREDICT, GOOD) for _ in range(40)]
  local_server.set_faults(Faults())

  unavailable = [s for s in statuses if s.status_code == 503]
  assert 5 <= len(unavailable) <= 20
  assert {s.status_code for s in statuses} == {200, 503}
  assert 'injected fault' in unavailable[0].json()['error']
  assert _send(local_server, 'POST', PREDICT, GOOD).status_code == 200


# --- The REST handler -----------------------------------------------------------------------------

def run_direct(handler: rest.ServingRestHandler, batch) -> list:
  client = handler.load_model()
  try:
    return list(handler.run_inference(list(batch), client))
  finally:
    client.close()


def test_handler_sizes_requests_retries_and_dead_letters_one_image(local_server, saved_model):
  batch = pixels(12, seed=4)
  batch[5][0, 0] = (255, 0, 255)
  local_server.set_faults(Faults(failure_fraction=0.3, seed=2,
                                 refuse_image=lambda image: tuple(image[0, 0]) == (255, 0, 255)))
  limit = 4 * (rest.JSON_BYTES_PER_IMAGE_BYTE * batch[0].nbytes) // 3   # 1 image a request
  handler = rest.ServingRestHandler(local_server.rest_address, image_size=IMAGE_SIZE,
                                    max_request_bytes=limit, **FAST)

  results = run_direct(handler, batch)

  want = expected(saved_model, schema.SERVING_SIGNATURE, images=batch)
  for i, result in enumerate(results):
    if i == 5:
      assert result.inference.reason == Reason.INFERENCE_FAILED
      assert 'HTTP 400' in result.inference.message and 'refused' in result.inference.message
      continue
    assert result.model_id == f'{schema.MODEL_NAME}/1' and result.inference['model_version'] == '1'
    for name in schema.OUTPUT_NAMES:
      assert np.abs(result.inference[name] - want[name][i]).max() <= 1e-6
  sizes = local_server.rest_predict_body_bytes
  assert max(sizes) <= limit and len(sizes) > 12   # one image each, and the 503s sent again


def test_handler_follows_a_new_version_and_names_it(tmp_path, export_base):
  shutil.copytree(export_base, tmp_path / 'export')
  base = str(tmp_path / 'export' / schema.MODEL_NAME)
  with LocalServingServer(base, rest_api_port=0, poll_seconds=0.2) as served:
    handler = rest.ServingRestHandler(served.rest_address, **FAST)
    client = handler.load_model()
    try:
      first = list(handler.run_inference(list(pixels(2)), client))
      keras.utils.set_random_seed(5)
      export_model(build_model(IMAGE_SIZE), str(tmp_path / 'export'))
      give_up_at = time.monotonic() + 30
      while served.served_version != 2:
        assert time.monotonic() < give_up_at
        time.sleep(0.1)
      second = list(handler.run_inference(list(pixels(2)), client))
    finally:
      client.close()
  assert {r.inference['model_version'] for r in first} == {'1'}
  assert {r.inference['model_version'] for r in second} == {'2'}
  assert {r.model_id for r in second} == {f'{schema.MODEL_NAME}/2'}
  assert np.abs(first[0].inference['ground'] - second[0].inference['ground']).max() > 1e-4


def test_https_with_a_private_root_certificate(model_dir):
  key, certificate = make_self_signed_certificate()
  with LocalServingServer(model_dir, rest_api_port=0, ssl_key=key, ssl_cert=certificate) as served:
    address = served.rest_address
    assert rest.check_serving_model(address, use_tls=True, root_certificates=certificate) == (
        IMAGE_SIZE, 1)
    handler = rest.ServingRestHandler(address, use_tls=True, root_certificates=certificate, **FAST)
    results = run_direct(handler, pixels(3))
    assert all(not isinstance(r.inference, InputRefused) for r in results)
    with pytest.raises(ValueError, match='no TF Serving REST API answered') as refused:
      rest.check_serving_model(address, timeout_secs=1)   # plain HTTP to an HTTPS port
    assert 'start one (docs/serving.md), fix the address' in str(refused.value)


def test_an_address_with_a_scheme_is_refused_in_one_line():
  for make in (lambda: rest.check_serving_model('http://localhost:8501', timeout_secs=1),
               lambda: rest.ServingRestHandler('https://localhost:8501')):
    with pytest.raises(ValueError, match=r'give HOST:PORT without a scheme \((http|https)://\), '
                                         r'e.g. --serving_address localhost:8501'):
      make()


def test_each_protocol_aimed_at_the_others_port_says_so(server):
  # What each port answers to the probe: the REST API speaks HTTP/1, gRPC HTTP/2.
  assert serving_address.answering_protocol(server.rest_address) == serving_address.HTTP1
  assert serving_address.answering_protocol(server.address) == serving_address.HTTP2
  started = time.monotonic()
  with pytest.raises(ValueError) as refused:
    rest.check_serving_model(server.address, timeout_secs=5)
  assert time.monotonic() - started < 2   # named at once, without waiting out the 5 s
  assert str(refused.value) == serving_address.rest_port_message(f'http://{server.address}')
  assert 'a gRPC (HTTP/2) server answered' in str(refused.value)
  with pytest.raises(ValueError) as refused:
    grpc_backend.check_serving_model(server.rest_address, timeout_secs=1)
  assert str(refused.value) == serving_address.grpc_port_message(server.rest_address)
  assert 'an HTTP/1 server answered' in str(refused.value)
  assert '--serving_protocol rest' in str(refused.value)


def test_each_protocol_aimed_at_the_others_port_says_so_over_tls(model_dir):
  key, certificate = make_self_signed_certificate()
  tls = {'use_tls': True, 'root_certificates': certificate}
  with LocalServingServer(model_dir, rest_api_port=0, ssl_key=key, ssl_cert=certificate) as served:
    with pytest.raises(ValueError, match=r'a gRPC \(HTTP/2\) server answered at https://'):
      rest.check_serving_model(served.address, timeout_secs=1, **tls)
    with pytest.raises(ValueError, match='an HTTP/1 server answered'):
      grpc_backend.check_serving_model(served.rest_address, timeout_secs=1, **tls)


@pytest.mark.parametrize('aim,protocol,said', [
    ('{grpc}', 'rest', 'a gRPC (HTTP/2) server answered'),
    ('http://{rest}', 'rest', 'give HOST:PORT without a scheme (http://)'),
    ('grpc://{grpc}', 'grpc', 'give HOST:PORT without a scheme (grpc://)'),
], ids=['rest_at_the_grpc_port', 'http_scheme', 'grpc_scheme'])
def test_the_command_refuses_a_wrong_address_in_one_line(tmp_path, capsys, server, chips, aim,
                                                         protocol, said):
  chips_dir, _ = chips
  address = aim.format(grpc=server.address, rest=server.rest_address)
  with pytest.raises(SystemExit) as ended:
    predict.main(['--input', str(chips_dir), '--output_dir', str(tmp_path / 'out'),
                  '--serving_address', address, '--serving_protocol', protocol])
  assert ended.value.code == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('predict: error: ') and said in lines[0], lines
  assert not (tmp_path / 'out').exists()


def test_check_serving_model_names_expected_and_found(server):
  assert rest.check_serving_model(server.rest_address) == (IMAGE_SIZE, 1)
  with pytest.raises(ValueError, match=r"does not serve Nope \(latest version\).*no versions"):
    rest.check_serving_model(server.rest_address, 'Nope')
  with pytest.raises(ValueError, match=r'version 7.*it has versions 1 \(AVAILABLE\)'):
    rest.check_serving_model(server.rest_address, model_version=7)
  with pytest.raises(ValueError, match="has no signature 'nope'"):
    rest.check_serving_model(server.rest_address, signature='nope')
  with pytest.raises(ValueError, match='takes 32x32'):
    rest.check_serving_model(server.rest_address, image_size=64)


# --- The prediction command -----------------------------------------------------------------------

@pytest.fixture(scope='module')
def mixed_folder(tmp_path_factory, chips):
  """The 24 chips, an empty file, a file that is not an image, and a chip cut in half."""
  chips_dir, _ = chips
  images = tmp_path_factory.mktemp('rest_mixed') / 'images'
  shutil.copytree(chips_dir, images)
  (images / 'empty.jpg').write_bytes(b'')
  (images / 'notes.jpg').write_bytes(b'these are not pixels')
  good = (images / 'chip_1.jpg').read_bytes()
  (images / 'cut.jpg').write_bytes(good[:len(good) // 2])
  return images


def _by_name(out) -> dict:
  return {r['image_name']: r for r in read_jsonl(out / PREDICTIONS)}


def _dead(out) -> list:
  return sorted((d['image_name'], d['reason'], d['message'])
                for d in read_jsonl(out / schema.DEAD_LETTERS_DIR / '*.jsonl'))


@pytest.mark.slow
def test_rest_job_equals_in_process_and_grpc(tmp_path, model_dir, mixed_folder):
  base = ['--input', str(mixed_folder), '--model_dir', model_dir, '--max_bad_fraction', '0.3']
  with LocalServingServer(model_dir, rest_api_port=0) as served:
    summaries = {
        'in_process': predict.run(base + ['--output_dir', str(tmp_path / 'in_process')]),
        'grpc': predict.run(base + ['--output_dir', str(tmp_path / 'grpc'),
                                    '--serving_address', served.address]),
        'rest': predict.run(base + ['--output_dir', str(tmp_path / 'rest'),
                                    '--serving_address', served.rest_address,
                                    '--serving_protocol', 'rest']),
    }
  assert summaries['rest']['backend'] == 'rest'
  assert summaries['rest']['counts'] == summaries['in_process']['counts'] == {
      'images_matched': 27, 'predictions': 24, 'dead_letters': 3}
  rows = {kind: _by_name(tmp_path / kind) for kind in summaries}
  assert rows['rest'].keys() == rows['in_process'].keys() == rows['grpc'].keys()
  largest = {'in_process': 0.0, 'grpc': 0.0}
  for name, row in rows['rest'].items():
    assert row['model_version'] == '1'
    for other in largest:
      assert row['tags'] == rows[other][name]['tags']
      for head in ('weather', 'ground'):
        gap = np.abs(np.array(list(row[head].values()))
                     - np.array(list(rows[other][name][head].values()))).max()
        largest[other] = max(largest[other], float(gap))
  assert max(largest.values()) <= 1e-5, largest
  assert _dead(tmp_path / 'rest') == _dead(tmp_path / 'in_process') == _dead(tmp_path / 'grpc')
  assert {reason for _, reason, _ in _dead(tmp_path / 'rest')} == {
      'EMPTY_FILE', 'NOT_AN_IMAGE', 'TRUNCATED_IMAGE'}
  print(f'\nREST job vs in-process, vs gRPC: largest probability difference '
        f'{largest["in_process"]:.1e}, {largest["grpc"]:.1e}')


FAULT_IMAGES = 300


@pytest.mark.slow
def test_rest_job_through_30_percent_503_and_a_restart(tmp_path, model_dir, chips,
                                                       pipeline_results):
  copies = link_copies(chips, tmp_path / 'images', FAULT_IMAGES)
  served = LocalServingServer(model_dir, rest_api_port=0,
                              faults=Faults(failure_fraction=0.3, seed=9))
  served.start()
  started = time.monotonic()
  try:
    with restarted_mid_job(served, lambda: len(served.rest_predict_body_bytes), 4) as restart:
      summary = predict.run([
          '--input', str(tmp_path / 'images'), '--output_dir', str(tmp_path / 'out'),
          '--serving_address', served.rest_address, '--serving_protocol', 'rest',
          '--model_dir', model_dir, '--retry_budget_secs', '20', '--batch_size', '64'])
  finally:
    served.stop()
  elapsed = time.monotonic() - started

  assert 'restarted_at' in restart, restart.get('error', 'the job ended before the restart')
  assert len(served.rest_predict_body_bytes) > restart['calls_before']
  predicted = [r['image_name'] for r in read_jsonl(tmp_path / 'out' / PREDICTIONS)]
  assert len(predicted) == len(set(predicted)) == FAULT_IMAGES and set(predicted) == set(copies)
  assert summary['counts'] == {'images_matched': FAULT_IMAGES, 'predictions': FAULT_IMAGES,
                               'dead_letters': 0}
  counters = progress.query_counters(pipeline_results[-1])
  assert counters['rest_predicted_images'] == FAULT_IMAGES
  assert counters['rest_retries'] > 0
  assert counters['rest_requests'] >= len(served.rest_predict_body_bytes)
  print(f'\nREST faults: {FAULT_IMAGES} images in {elapsed:.1f}s, {counters["rest_requests"]} '
        f'attempts ({counters["rest_retries"]} retries), server saw '
        f'{len(served.rest_predict_body_bytes)} calls, restarted after '
        f'{restart["calls_before"]}; 0 lost, 0 duplicated')
