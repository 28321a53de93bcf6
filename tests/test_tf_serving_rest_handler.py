"""TF Serving's own http_rest_api_handler_test.cc, ported: the local server's REST API answers so.

The C++ test serves `saved_model_half_plus_two` (y = 0.5 * x + 2) as model
`saved_model_half_plus_two_2_versions`, version 123, labelled `Version_Label` by a reloaded
config; the fixture builds the same model (signatures `serving_default`: x [-1, 1] -> y;
`regress_x_to_y` and `classify_x_to_y`: serialized tf.Examples -> y, with TF Serving's method
names) and serves it from a `--model_config_file` in TF Serving's text format, over real HTTP on
loopback. Each TEST's calls and expected answers are carried over; `:classify` and `:regress`
are the documented difference (501, README: "Where the local server differs from TF Serving").
"""
import base64
import json

import pytest
import requests
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from model.serving.local_server import LocalServingServer
from model.serving.rest_protocol import PREDICT_PATH, STATUS_PATH

MODEL = 'saved_model_half_plus_two_2_versions'
VERSION = 123
LABEL = 'Version_Label'
METHODS = {'regress_x_to_y': 'tensorflow/serving/regress',
           'classify_x_to_y': 'tensorflow/serving/classify'}


class HalfPlusTwo(tf.Module):
  """y = 0.5 * x + 2, as TF Serving's saved_model_half_plus_two.py builds it."""

  def __init__(self):
    super().__init__()
    self.a, self.b = tf.Variable(0.5), tf.Variable(2.0)

  @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name='x')])
  def predict(self, x):
    return {'y': self.a * x + self.b}

  def _from_examples(self, serialized):
    x = tf.io.parse_example(serialized, {'x': tf.io.FixedLenFeature([1], tf.float32)})['x']
    return self.a * x + self.b

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='inputs')])
  def regress(self, inputs):
    return {'outputs': self._from_examples(inputs)}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='inputs')])
  def classify(self, inputs):
    return {'scores': self._from_examples(inputs)}


def save_half_plus_two(version_dir: str) -> None:
  module = HalfPlusTwo()
  tf.saved_model.save(module, version_dir, signatures={
      'serving_default': module.predict, 'regress_x_to_y': module.regress,
      'classify_x_to_y': module.classify})
  # TF 2 saves every signature as a predict one; TF Serving's model has its methods.
  path = f'{version_dir}/saved_model.pb'
  saved = saved_model_pb2.SavedModel.FromString(open(path, 'rb').read())
  for name, method in METHODS.items():
    saved.meta_graphs[0].signature_def[name].method_name = method
  with open(path, 'wb') as f:
    f.write(saved.SerializeToString())


def write_config(path, base_path, labels: dict, versions=(VERSION,)) -> None:
  specific = ' '.join(f'versions: {v}' for v in versions)
  label_text = ' '.join(f'version_labels {{ key: "{k}" value: {v} }}' for k, v in labels.items())
  path.write_text(f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{base_path}" '
                  f'model_platform: "tensorflow" model_version_policy {{ specific {{ {specific} }} }} '
                  f'{label_text} }} }}\n')


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  base = tmp_path_factory.mktemp('half_plus_two') / MODEL
  save_half_plus_two(str(base / str(VERSION)))
  config = base.parent / 'models.config'
  write_config(config, base, {LABEL: VERSION})
  with LocalServingServer(None, rest_api_port=0, model_config_file=str(config)) as running:
    yield running


def call(server, method: str, path: str, body: str = '') -> tuple[int, dict]:
  answer = requests.request(method, f'http://{server.rest_address}{path}', data=body.encode(),
                            timeout=30)
  return answer.status_code, answer.json()


def test_k_path_regex():
  # kPathRegex is (?i)/v1/.*: the local server's routes are under it, and nothing else.
  assert STATUS_PATH.fullmatch('/v1/models')
  assert not STATUS_PATH.fullmatch('/statuspage') and not PREDICT_PATH.fullmatch('/index')


UNSUPPORTED = [
    ('GET', '/v1/foo', 'Malformed request'),
    ('POST', '/v1/foo', 'Malformed request'),
    ('GET', '/v1/models', 'Missing model name'),
    ('GET', '/v1/models/debug/model_name', 'Malformed request'),
    ('POST', '/v1/models', 'Malformed request'),
    ('GET', '/v1/models/foo:predict', 'Malformed request'),
    ('GET', '/v1/models/foo/version/50:predict', 'Malformed request'),
    ('POST', '/v1/models/foo/version/50:regress', 'Malformed request'),
    ('POST', '/v1/models/foo/versions/HELLO:regress', 'Malformed request'),
    ('POST', f'/v1/models/foo/versions/{2 ** 64 - 1}:regress', 'Failed to convert version'),
    ('POST', '/v1/models/foo/metadata', 'Malformed request'),
    ('POST', '/v1/models/foo/label/some_label:regress', 'Malformed request'),
    ('POST', '/v1/models/foo/versions/50/labels/some_label:regress', 'Malformed request'),
    ('POST', '/v1/models/foo/versions/some_label:regress', 'Malformed request'),
]


@pytest.mark.parametrize('method,path,words', UNSUPPORTED)
def test_unsupported_api_calls(server, method, path, words):
  status, answer = call(server, method, path)
  assert status == 400 and words in answer['error']


@pytest.mark.parametrize('path', ['/v1/models/foo:predict', '/v1/models/foo/versions/50:predict',
                                  f'/v1/models/{MODEL}99:predict'])
def test_predict_model_name_version_errors(server, path):
  assert call(server, 'POST', path, '{ "instances": [1] }')[0] == 404


PREDICT = f'/v1/models/{MODEL}:predict'
REQUEST_ERRORS = [
    (PREDICT, '', 'JSON Parse error: The document is empty'),
    (PREDICT, 'instances = [1, 2]', 'JSON Parse error: Invalid value'),
    (PREDICT, '{ "instances": ["x", "y"] }', 'not of expected type: float'),
    (f'/v1/models/{MODEL}/labels/Version_Nonexistent:predict', '{ "instances": ["x", "y"] }',
     'Unrecognized servable version label'),
    (PREDICT, '{ "signature_name": 100 }', "'signature_name' key must be a string value."),
]


@pytest.mark.parametrize('path,body,words', REQUEST_ERRORS)
def test_predict_request_errors(server, path, body, words):
  status, answer = call(server, 'POST', path, body)
  assert status == 400 and words in answer['error']


ONE = f'/v1/models/{MODEL}/versions/{VERSION}:predict'
BY_LABEL = f'/v1/models/{MODEL}/labels/{LABEL}:predict'
PREDICTIONS = [
    (PREDICT, '{"instances": [[1.0, 2.0], [3.0, 4.0]]}', {'predictions': [[2.5, 3.0], [3.5, 4.0]]}),
    (ONE, '{"instances": [1.0, 2.0]}', {'predictions': [2.5, 3.0]}),
    (BY_LABEL, '{"instances": [1.0, 2.0]}', {'predictions': [2.5, 3.0]}),
    (ONE, '{"signature_name": "serving_default", "instances": [3.0, 4.0]}',
     {'predictions': [3.5, 4.0]}),
    (ONE, '{"signature_name": "serving_default", "inputs": [3.0, 4.0]}', {'outputs': [3.5, 4.0]}),
]


@pytest.mark.parametrize('path,body,expected', PREDICTIONS)
def test_predict(server, path, body, expected):
  # [[1.0, 2.0], [3.0, 4.0]] into x [-1, 1]: TF Serving feeds it as sent, y is elementwise.
  assert call(server, 'POST', path, body) == (200, expected)


def example(x: float) -> str:
  features = tf.train.Features(feature={'x': tf.train.Feature(
      float_list=tf.train.FloatList(value=[x]))})
  return base64.b64encode(tf.train.Example(features=features).SerializeToString()).decode()


@pytest.mark.parametrize('signature,output', [('regress_x_to_y', 80.0), ('classify_x_to_y', 20.0)])
def test_predict_runs_classify_and_regress_signatures(server, signature, output):
  # predict_util.cc runs a signature of any of the three methods through Predict.
  body = json.dumps({'signature_name': signature, 'instances': [{'b64': example(output)}]})
  assert call(server, 'POST', BY_LABEL, body) == (200, {'predictions': [[0.5 * output + 2]]})


@pytest.mark.parametrize('path,body', [
    (f'/v1/models/{MODEL}:regress', '{"signature_name": "regress_x_to_y", "examples": [{"x": 80.0}]}'),
    (f'/v1/models/{MODEL}/versions/{VERSION}:regress',
     '{"signature_name": "regress_x_to_y", "examples": [{"x": 80.0}]}'),
    (f'/v1/models/{MODEL}/labels/{LABEL}:regress',
     '{"signature_name": "regress_x_to_y", "examples": [{"x": 80.0}]}'),
    (f'/v1/models/{MODEL}:classify',
     '{"signature_name": "classify_x_to_y", "examples": [{"x": 20.0}]}'),
    (f'/v1/models/{MODEL}/labels/{LABEL}:classify',
     '{"signature_name": "classify_x_to_y", "examples": [{"x": 10.0}]}'),
])
def test_classify_and_regress_cases_are_a_documented_difference(server, path, body):
  # TF Serving answers {"results": [42]} and [[["", 12]]]; the local server answers 501 and
  # names :predict, which runs these signatures (the previous test).
  status, answer = call(server, 'POST', path, body)
  assert status == 501 and ':predict' in answer['error']


STATUS = {'model_version_status': [{'version': str(VERSION), 'state': 'AVAILABLE',
                                    'status': {'error_code': 'OK', 'error_message': ''}}]}


@pytest.mark.parametrize('path', [f'/v1/models/{MODEL}', f'/v1/models/{MODEL}/versions/{VERSION}',
                                  f'/v1/models/{MODEL}/labels/{LABEL}',
                                  f'/v1/models/{MODEL}/METADATA'])
def test_get_status(server, path):
  # '/METADATA': the path matches case-insensitively, but only 'metadata' asks for metadata.
  assert call(server, 'GET', path) == (200, STATUS)


@pytest.mark.parametrize('path', [f'/v1/models/{MODEL}/metadata',
                                  f'/v1/models/{MODEL}/labels/{LABEL}/metadata'])
def test_get_model_metadata(server, path):
  # The C++ test compares with saved_model_half_plus_two_2_versions_metadata.json: its shape.
  status, answer = call(server, 'GET', path)
  assert status == 200
  assert answer['model_spec'] == {'name': MODEL, 'signature_name': '', 'version': str(VERSION)}
  signatures = answer['metadata']['signature_def']['signature_def']
  assert {name: s['method_name'] for name, s in signatures.items() if name in METHODS} == METHODS
  x = signatures['serving_default']['inputs']['x']
  assert (x['dtype'], [d['size'] for d in x['tensor_shape']['dim']]) == ('DT_FLOAT', ['-1', '1'])
