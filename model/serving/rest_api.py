"""The local server's REST API: TF Serving's routes, answered by the services of its gRPC API.

As in tensorflow_serving/model_servers/http_rest_api_handler.cc, a REST call is turned into the
gRPC request it stands for and answered by the same code: `POST /v1/models/NAME[/versions/N]
:predict` becomes a `PredictRequest` for `PredictionService.Predict` (so the fault injection, the
signature, dtype and shape checks and their messages are the gRPC API's),
`GET /v1/models/NAME[/versions/N]` is `GetModelStatus` and `GET .../metadata` is
`GetModelMetadata`, each answered in TF Serving's JSON shape. An error is `{"error": "<message>"}` with the HTTP status TF Serving gives its code.

Deliberate differences: `:classify` and `:regress` answer 501 (the batch job predicts only; a
classify or regress signature is served through `:predict`); a path outside /v1/ answers 404 with
a JSON error (TF Serving: an HTML page).

Usage:
  api = RestApi(repository, prediction_service, model_service)
  status, body = api.answer('POST', '/v1/models/PlanetModel:predict', b'{"instances": [...]}')
"""
import json
import urllib.parse

import grpc
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.apis import predict_pb2

from model import schema
from model.serving.protocol import METADATA_FIELD
from model.serving.protocol import tensor_from_proto
from model.serving.refusal import Refusal
from model.serving.repository import ModelRepository
from model.serving.rest_protocol import HTTP_STATUS_BY_CODE
from model.serving.rest_protocol import PREDICT_PATH
from model.serving.rest_protocol import STATUS_PATH
from model.serving.rest_protocol import error_body
from model.serving.rest_answers import write_answer
from model.serving.rest_json import read_request
from model.serving.rest_tensors import read_inputs
from model.serving.rest_tensors import signature_name
from model.serving.services import ModelService
from model.serving.services import PredictionService

__all__ = ['RestApi']

_INT64_MAX = 2 ** 63 - 1


class _RefusingContext:
  """The gRPC servicer context a REST call hands the services: `abort` raises the `Refusal`."""

  def abort(self, code: grpc.StatusCode, details: str):
    raise Refusal(code, details)

  def time_remaining(self) -> None:
    """TF Serving's REST API takes no deadline."""
    return None


def _model_spec(name: str, version: str, label: str,
                signature: str = '') -> model_pb2.ModelSpec:
  """ParseModelInfo + FillModelSpecWithNameVersionAndLabel: the URL's name, version or label."""
  spec = model_pb2.ModelSpec(name=urllib.parse.unquote(name), signature_name=signature)
  if version:
    if int(version) > _INT64_MAX:
      raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                    f'Failed to convert version: {version} to numeric.')
    spec.version.value = int(version)
  if label:
    spec.version_label = urllib.parse.unquote(label)
  return spec


def _status_json(response: get_model_status_pb2.GetModelStatusResponse) -> bytes:
  # TF Serving prints every field, with the protos' json_name (model_version_status, error_code).
  return json_format.MessageToJson(response, always_print_fields_with_no_presence=True).encode()


def _metadata_json(response: get_model_metadata_pb2.GetModelMetadataResponse) -> bytes:
  # TF Serving prints the model spec and the unpacked SignatureDefMap with proto field names,
  # nested as {"model_spec": ..., "metadata": {"signature_def": {"signature_def": ...}}}.
  signature_map = get_model_metadata_pb2.SignatureDefMap()
  response.metadata[METADATA_FIELD].Unpack(signature_map)

  def as_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
  return json.dumps({'model_spec': as_dict(response.model_spec),
                     'metadata': {METADATA_FIELD: as_dict(signature_map)}}, indent=1).encode()


class RestApi:
  """Answers TF Serving's REST calls with the gRPC API's services; no HTTP here (see rest_server).

  Args:
    repository: the versions served.
    prediction_service: answers Predict and GetModelMetadata (its faults apply to REST too).
    model_service: answers GetModelStatus.
    predict_body_bytes: a list to which the size of every `:predict` body is appended (tests).
  """

  def __init__(self, repository: ModelRepository, prediction_service: PredictionService,
               model_service: ModelService, predict_body_bytes: list[int] | None = None):
    self._repository = repository
    self._prediction = prediction_service
    self._models = model_service
    self._predict_body_bytes = [] if predict_body_bytes is None else predict_body_bytes

  def answer(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    """(HTTP status, JSON body) for a call; `path` is the URL's path, still percent-encoded."""
    try:
      return 200, self._route(method.upper(), path, body)
    except Refusal as refusal:
      return HTTP_STATUS_BY_CODE.get(refusal.code, 500), error_body(refusal.message)

  def _route(self, method: str, path: str, body: bytes) -> bytes:
    if not path.lower().startswith('/v1/'):
      raise Refusal(grpc.StatusCode.NOT_FOUND, f'Not Found: {path[:200]} (the API is under /v1/)')
    if method == 'POST':
      found = PREDICT_PATH.fullmatch(path)
      if found:
        # As ProcessRequest does: the version is read before the method is looked at.
        # The path matches case-insensitively, the method name only as written (':PREDICT' is
        # a malformed request there too).
        spec = _model_spec(*found.group(1, 2, 3))
        if found.group(4) == 'predict':
          self._predict_body_bytes.append(len(body))   # one append: atomic across threads
          return self._predict(spec, body)
        if found.group(4) in ('classify', 'regress'):
          raise Refusal(grpc.StatusCode.UNIMPLEMENTED,
                        f':{found.group(4)} is not served here (use :predict, which also runs '
                        'classify and regress signatures)')
    elif method == 'GET':
      found = STATUS_PATH.fullmatch(path)
      if found:
        name, version, label, metadata = found.groups()
        if not name:
          raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, 'Missing model name in request.')
        spec = _model_spec(name, version, label)
        # The path matches case-insensitively, but only 'metadata' itself asks for metadata
        # (ProcessModelMetadataRequest); '/METADATA' answers the status, as in TF Serving.
        return self._metadata(spec) if metadata == 'metadata' else self._status(spec)
    raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f'Malformed request: {method} {path[:200]}')

  def _predict(self, spec: model_pb2.ModelSpec, body: bytes) -> bytes:
    doc = read_request(body)
    spec.signature_name = signature_name(doc)
    served = self._repository.resolve(spec)
    wanted = spec.signature_name or schema.SERVING_SIGNATURE
    signature = served.signature_defs.get(wanted)
    if signature is None:
      raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                    f'Serving signature name: "{wanted}" not found in signature def')
    arrays, row_format = read_inputs(doc, signature.inputs)
    request = predict_pb2.PredictRequest(model_spec=spec)
    for alias, array in arrays.items():
      request.inputs[alias].CopyFrom(tf.make_tensor_proto(array))
    response = self._prediction.Predict(request, _RefusingContext())
    return write_answer({alias: tensor_from_proto(tensor)
                         for alias, tensor in response.outputs.items()}, row_format)

  def _status(self, spec: model_pb2.ModelSpec) -> bytes:
    request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
    return _status_json(self._models.GetModelStatus(request, _RefusingContext()))

  def _metadata(self, spec: model_pb2.ModelSpec) -> bytes:
    request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec,
                                                             metadata_field=[METADATA_FIELD])
    return _metadata_json(self._prediction.GetModelMetadata(request, _RefusingContext()))
