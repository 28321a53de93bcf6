"""The gRPC backend of the prediction job: TensorFlow Serving's PredictionService, as a transport.

`GrpcTransport` is the wire under `serving_base.ServingHandler` for TF Serving's gRPC API
(`--port`, 8500): a batch of images is one `tensorflow.serving.PredictRequest` (a uint8 tensor,
sized by its serialized bytes), the answer's `PredictResponse` gives the version that answered and
the output tensors, and a failure is its gRPC status as it came. The model's version, or its
version label (`ModelSpec.version_label`), is asked for in every request and resolved by the
server; each answer says which version it was. The start-up check asks GetModelMetadata (waiting
for a server still starting) and, for a model it does not serve, GetModelStatus. The messages are
`model.serving.protocol`'s, which the local test server speaks too.

`ServingGrpcHandler` is the handler over it: batching, retries, throttling, dead letters and rows
are `serving_base`'s.

Usage:
  image_size, version = check_serving_model('tfserving:8500', use_tls=True)   # before the pipeline
  handler = KeyedModelHandler(ServingGrpcHandler('tfserving:8500', use_tls=True))
  predictions = keyed_images | RunInference(handler)
"""
from typing import Any

import grpc
import numpy as np
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from beam_jobs.predict.backends.retry_policy import CallFailed
from beam_jobs.predict.backends.serving_address import HTTP1
from beam_jobs.predict.backends.serving_address import answering_protocol
from beam_jobs.predict.backends.serving_address import check_serving_address
from beam_jobs.predict.backends.serving_address import grpc_port_message
from beam_jobs.predict.backends.serving_base import ServingHandler
from beam_jobs.predict.backends.serving_check import check_served_model
from beam_jobs.predict.backends.transport import ServedModel, Transport
from model import schema
from model.serving.protocol import METADATA_FIELD
from model.serving.protocol import build_predict_request
from model.serving.protocol import check_transport
from model.serving.protocol import open_channel
from model.serving.protocol import tensor_from_proto

__all__ = ['GrpcConnection', 'GrpcTransport', 'ServingGrpcHandler', 'check_serving_model']

# A gRPC failure that means no server answered (nothing listens, or nothing in time), not a refusal.
_UNANSWERED_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _call_failed(error: grpc.RpcError) -> CallFailed:
  """A stub's error in the retry policy's terms."""
  code = error.code()
  return CallFailed(code, error.details(), answered=code not in _UNANSWERED_CODES)


class GrpcConnection:
  """One channel to the server and the stubs of its two services."""

  def __init__(self, channel: grpc.Channel):
    self.channel = channel
    self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    self.models = model_service_pb2_grpc.ModelServiceStub(channel)

  def close(self) -> None:
    self.channel.close()


class GrpcTransport(Transport):
  """TF Serving's gRPC API at `address` (HOST:PORT).

  Args:
    use_tls, root_certificates, tls_server_name, allow_insecure: the channel, see
      `model.serving.protocol.check_transport`; `root_certificates` is PEM bytes
      (`transport.read_root_certificates`), carried to the workers inside the handler.
  """
  name = 'grpc'

  def __init__(self, address: str, *, use_tls: bool = False,
               root_certificates: bytes | None = None, tls_server_name: str | None = None,
               allow_insecure: bool = False):
    self.address = address
    self._use_tls = use_tls
    self._root_certificates = root_certificates
    self._tls_server_name = tls_server_name
    self._allow_insecure = allow_insecure

  def connect(self, max_requests_in_flight: int) -> GrpcConnection:
    del max_requests_in_flight   # one HTTP/2 channel carries them all
    return GrpcConnection(open_channel(self.address, use_tls=self._use_tls,
                                       root_certificates=self._root_certificates,
                                       tls_server_name=self._tls_server_name,
                                       allow_insecure=self._allow_insecure))

  def encode(self, images: list[np.ndarray], model: ServedModel) -> predict_pb2.PredictRequest:
    return build_predict_request(images, model.name, model.version, model.signature, model.label)

  def payload_bytes(self, payload: predict_pb2.PredictRequest) -> int:
    return payload.ByteSize()

  def send(self, connection: GrpcConnection, payload: predict_pb2.PredictRequest,
           model: ServedModel, timeout_secs: float) -> predict_pb2.PredictResponse:
    try:
      return connection.predictions.Predict(payload, timeout=timeout_secs)
    except grpc.RpcError as error:
      raise _call_failed(error) from None

  def decode(self, answer: predict_pb2.PredictResponse) -> tuple[int, dict[str, np.ndarray]]:
    for name in schema.OUTPUT_NAMES:
      if name not in answer.outputs:
        raise ValueError(f'the answer has no output {name!r} (it has {sorted(answer.outputs)})')
    return int(answer.model_spec.version.value), {
        name: tensor_from_proto(answer.outputs[name]) for name in schema.OUTPUT_NAMES}

  def metadata(self, connection: GrpcConnection, model: ServedModel, timeout_secs: float
               ) -> tuple[str, int, get_model_metadata_pb2.SignatureDefMap | None]:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[METADATA_FIELD])
    request.model_spec.name = model.name
    if model.version is not None:
      request.model_spec.version.value = model.version
    if model.label is not None:
      request.model_spec.version_label = model.label
    try:
      # wait_for_ready: a server that is still starting is waited for, up to the deadline.
      response = connection.predictions.GetModelMetadata(request, timeout=timeout_secs,
                                                         wait_for_ready=True)
    except grpc.RpcError as error:
      raise _call_failed(error) from None
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    if METADATA_FIELD not in response.metadata or not response.metadata[METADATA_FIELD].Unpack(
        signature_map):
      signature_map = None
    return response.model_spec.name, response.model_spec.version.value, signature_map

  def versions(self, connection: GrpcConnection, model_name: str,
               timeout_secs: float) -> dict[int, str]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model_name
    try:
      response = connection.models.GetModelStatus(request, timeout=timeout_secs)
    except grpc.RpcError as error:
      raise _call_failed(error) from None
    states = get_model_status_pb2.ModelVersionStatus.State
    return {s.version: states.Name(s.state) for s in response.model_version_status}

  def failure_text(self, failure: CallFailed) -> str:
    return f'{failure.code.name}: {failure.details}'

  def unanswered_message(self, failure: CallFailed, timeout_secs: float) -> str:
    """A REST port named as such (one short probe, `serving_address`); else, start a server."""
    if answering_protocol(self.address, use_tls=self._use_tls,
                          root_certificates=self._root_certificates,
                          server_name=self._tls_server_name) == HTTP1:
      return grpc_port_message(self.address)
    return (f'no TF Serving answered at {self.address} within {timeout_secs:g}s '
            f'({self.failure_text(failure)}); start one (docs/serving.md) or fix the address')


def check_serving_model(address: str, *model: Any, use_tls: bool = False,
                        root_certificates: bytes | None = None,
                        tls_server_name: str | None = None, allow_insecure: bool = False,
                        **model_and_timeout: Any) -> tuple[int, int]:
  """`serving_check.check_served_model` over gRPC: returns (image_size, version).

  Args:
    address: HOST:PORT of the server.
    *model, **model_and_timeout: `check_served_model`'s: model_name, model_version, signature,
      image_size, timeout_secs (10 s: how long a server still starting is waited for),
      model_version_label.
    use_tls, root_certificates, tls_server_name, allow_insecure: as `GrpcTransport`'s.

  Raises:
    ValueError: naming what was expected and what was found.
  """
  check_serving_address(address)
  transport = GrpcTransport(address, use_tls=use_tls, root_certificates=root_certificates,
                            tls_server_name=tls_server_name, allow_insecure=allow_insecure)
  return check_served_model(transport, *model, **model_and_timeout)


class ServingGrpcHandler(ServingHandler):
  """Predicts uint8 [H, W, 3] images with a model served by TensorFlow Serving, over gRPC.

  Args:
    address: HOST:PORT of the server.
    use_tls, root_certificates, tls_server_name, allow_insecure: as `GrpcTransport`'s.
    **model_and_limits: `serving_base.ServingHandler`'s (model_name, model_version,
      model_version_label, signature, image_size, max_request_bytes: the largest serialized
      request, batching, deadlines, retries, throttling).
  """

  def __init__(self, address: str, *, use_tls: bool = False,
               root_certificates: bytes | None = None, tls_server_name: str | None = None,
               allow_insecure: bool = False, **model_and_limits: Any):
    check_serving_address(address)
    check_transport(address, use_tls=use_tls, allow_insecure=allow_insecure)
    super().__init__(GrpcTransport(address, use_tls=use_tls, root_certificates=root_certificates,
                                   tls_server_name=tls_server_name, allow_insecure=allow_insecure),
                     **model_and_limits)
