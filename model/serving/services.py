"""The local server's gRPC services: TF Serving's Predict, GetModelMetadata and GetModelStatus."""
import threading

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from model import schema
from model.serving.batching import BatchScheduler
from model.serving.batching import batch_key
from model.serving.faults import FaultInjector
from model.serving.protocol import METADATA_FIELD
from model.serving.protocol import tensor_as_proto_field
from model.serving.protocol import tensor_from_proto
from model.serving.refusal import Refusal
from model.serving.repository import ModelRepository

__all__ = ['ModelService', 'PredictionService', 'RequestStats']

# predict_util.cc runs a signature of any of these methods (a classify or regress signature is
# fed its serialized tf.Examples as a string tensor).
_PREDICT_METHODS = ('tensorflow/serving/predict', 'tensorflow/serving/classify',
                    'tensorflow/serving/regress')
_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
# How long a batched request waits for its model call when the caller set no deadline (REST has
# none): a bound, so that no server thread waits forever.
_NO_DEADLINE_WAIT_SECS = 300.0


def _dtype_name(dtype: int) -> str:
  try:
    return tf.dtypes.as_dtype(dtype).name
  except TypeError:
    return types_pb2.DataType.Name(dtype)


class RequestStats:
  """What the server saw, for tests and benchmarks: every Predict request's size, every model call.

  With server-side batching, one model call answers several requests: `model_call_requests`
  against the number of requests shows how many were merged.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self.predict_request_bytes: list[int] = []
    self.model_call_rows: list[int] = []       # rows (images) of each model call
    self.model_call_requests: list[int] = []   # requests each model call answered
    self.predicts_in_progress = 0
    self.peak_predicts_in_progress = 0         # how many requests a client had in flight at most

  def record(self, request) -> None:
    """A Predict arrived (`done` says when it is answered)."""
    with self._lock:
      self.predict_request_bytes.append(request.ByteSize())
      self.predicts_in_progress += 1
      self.peak_predicts_in_progress = max(self.peak_predicts_in_progress,
                                           self.predicts_in_progress)

  def done(self) -> None:
    with self._lock:
      self.predicts_in_progress -= 1

  def record_model_call(self, rows: int, requests: int) -> None:
    with self._lock:
      self.model_call_rows.append(rows)
      self.model_call_requests.append(requests)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
  """Predict and GetModelMetadata, following predict_util.cc and get_model_metadata_impl.cc."""

  def __init__(self, repository: ModelRepository, faults: FaultInjector, stats: RequestStats,
               batching: BatchScheduler | None = None):
    self._repository = repository
    self._faults = faults
    self._stats = stats
    self._batching = batching

  def Predict(self, request, context):  # pylint: disable=invalid-name
    self._stats.record(request)
    try:
      self._faults.before_call()
      remaining = context.time_remaining()
      return self._predict(request, _NO_DEADLINE_WAIT_SECS if remaining is None else remaining)
    except Refusal as refusal:
      context.abort(refusal.code, refusal.message)
    finally:
      self._stats.done()

  def _predict(self, request, wait_secs: float):
    served = self._repository.resolve(request.model_spec)
    signature_name = request.model_spec.signature_name or schema.SERVING_SIGNATURE
    signature = served.signature_defs.get(signature_name)
    if signature is None:
      # TF Serving answers FAILED_PRECONDITION here (predict_util.cc), not INVALID_ARGUMENT.
      raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                    f'Serving signature key "{signature_name}" not found.')
    if signature.method_name not in _PREDICT_METHODS or signature_name not in served.functions:
      raise Refusal(grpc.StatusCode.INTERNAL,
                    'Expected prediction signature method_name to be one of '
                    f'{{{", ".join(_PREDICT_METHODS)}}}. Was: {signature.method_name}')
    inputs = self._inputs(signature, request)
    aliases = self._output_aliases(signature, request)
    function = served.functions[signature_name]

    def run_model(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
      self._faults.during_model_call()
      outputs = function(**{alias: tf.constant(array) for alias, array in arrays.items()})
      return {alias: tensor.numpy() for alias, tensor in outputs.items()}

    try:
      if self._batching is None:
        outputs = run_model(inputs)
        self._stats.record_model_call(len(next(iter(inputs.values()))), 1)
      else:
        outputs = self._batching.run(batch_key(served.version, signature_name, inputs),
                                     run_model, inputs, wait_secs)
    except tf.errors.OpError as error:
      raise Refusal(_CODES_BY_NUMBER.get(error.error_code, grpc.StatusCode.UNKNOWN),
                    error.message) from error
    except (TypeError, ValueError) as error:
      raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error
    response = predict_pb2.PredictResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = served.version
    response.model_spec.signature_name = signature_name
    for alias in aliases:
      response.outputs[alias].CopyFrom(tensor_as_proto_field(outputs[alias]))
    return response

  def _inputs(self, signature, request) -> dict[str, np.ndarray]:
    sent, wanted = set(request.inputs), set(signature.inputs)
    if len(sent) != len(wanted):
      raise Refusal(
          grpc.StatusCode.INVALID_ARGUMENT,
          f'input size does not match signature: {len(sent)}!={len(wanted)} '
          f'len({{{",".join(sorted(sent))}}}) != len({{{",".join(sorted(wanted))}}}). '
          f'Sent extra: {{{",".join(sorted(sent - wanted))}}}. '
          f'Missing but required: {{{",".join(sorted(wanted - sent))}}}.')
    arrays = {}
    for position, (alias, info) in enumerate(sorted(signature.inputs.items())):
      if alias not in request.inputs:
        raise Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f'Signature input alias: {alias}(feed name: {info.name}) not found in request and '
            f'no default value provided. Inputs expected to be in the request '
            f'{{{",".join(sorted(sent))}}}, or default input alias set: ')
      proto = request.inputs[alias]
      if proto.dtype != info.dtype:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                      f'Expects arg[{position}] to be {_dtype_name(info.dtype)} but '
                      f'{_dtype_name(proto.dtype)} is provided')
      try:
        array = tensor_from_proto(proto)
      except Exception as error:  # pylint: disable=broad-except
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                      f'tensor parsing error: {alias}') from error
      # TF Serving feeds a tensor as sent, whatever the signature's dimensions, and the model's
      # own ops refuse a shape they cannot take. Only an image input (4-D in the signature)
      # given another rank is refused here: TensorFlow's oneDNN convolution aborts the whole
      # process on one (a CHECK in tensor_format.h), where a build without oneDNN answers
      # INVALID_ARGUMENT.
      rank = len(info.tensor_shape.dim)
      if not info.tensor_shape.unknown_rank and rank == 4 and array.ndim != rank:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                      f'input {alias} must be {rank}-dimensional, got shape '
                      f'[{",".join(str(d) for d in array.shape)}]')
      self._faults.check_images(alias, array)
      arrays[alias] = array
    return arrays

  @staticmethod
  def _output_aliases(signature, request) -> list[str]:
    aliases = []
    for alias in request.output_filter:
      if alias not in signature.outputs:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                      f'output tensor alias not found in signature: {alias} Outputs expected to '
                      f'be in the set {{{",".join(sorted(signature.outputs))}}}.')
      if alias in aliases:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                      f'duplicate output tensor alias: {alias}')
      aliases.append(alias)
    return aliases or sorted(signature.outputs)

  def GetModelMetadata(self, request, context):  # pylint: disable=invalid-name
    try:
      return self._metadata(request)
    except Refusal as refusal:
      context.abort(refusal.code, refusal.message)

  def _metadata(self, request):
    if not request.HasField('model_spec'):
      raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, 'Missing ModelSpec')
    if not request.metadata_field:
      raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                    'GetModelMetadataRequest must specify at least one metadata_field')
    for field in request.metadata_field:
      if field != METADATA_FIELD:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f'Metadata field {field} is not supported')
    served = self._repository.resolve(request.model_spec)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in served.signature_defs.items():
      signature_map.signature_def[name].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = self._repository.model_name
    response.model_spec.version.value = served.version
    response.metadata[METADATA_FIELD].Pack(signature_map)
    return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
  """GetModelStatus, following get_model_status_impl.cc (versions let go stay listed as END)."""

  def __init__(self, repository: ModelRepository):
    self._repository = repository

  def GetModelStatus(self, request, context):  # pylint: disable=invalid-name
    spec = request.model_spec
    if not request.HasField('model_spec'):
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, 'Missing ModelSpec')
    states = self._repository.states() if spec.name == self._repository.model_name else {}
    if spec.version_label or spec.HasField('version'):
      try:   # get_model_status_impl.cc: a label is the version it names
        version = (self._repository.label_version(spec.name, spec.version_label)
                   if spec.version_label else spec.version.value)
      except Refusal as refusal:
        context.abort(refusal.code, refusal.message)
      if version not in states:
        context.abort(grpc.StatusCode.NOT_FOUND,
                      f'Could not find version {version} of model {spec.name}')
      states = {version: states[version]}
    elif not states:
      context.abort(grpc.StatusCode.NOT_FOUND, f'Could not find any versions of model {spec.name}')
    response = get_model_status_pb2.GetModelStatusResponse()
    for version in sorted(states, reverse=True):
      state, message = states[version]
      status = response.model_version_status.add(version=version, state=state)
      # tensorflow.error.Code: 0 OK, 13 INTERNAL.
      status.status.error_code = 13 if message else 0
      status.status.error_message = message
    return response
