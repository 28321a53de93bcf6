"""The gRPC backend of the prediction job: a Beam ModelHandler that asks TensorFlow Serving.

`ServingGrpcHandler` is a `RemoteModelHandler`: Beam batches the images, and each batch becomes
one or more `tensorflow.serving.PredictRequest`s (uint8 tensors, several images each, every request
under `max_request_bytes`) sent in parallel over one channel. Each call has a deadline; calls that
fail with a transient code (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) are retried with
jittered exponential backoff for up to `retry_budget_secs`, behind Beam's client-side throttler.
A request refused for a reason that may lie in one image (INVALID_ARGUMENT, INTERNAL, ...) is
re-sent image by image, so one bad image never takes its batch down. Nothing is raised for an
image that cannot be predicted: it comes back as an `InputRefused` (UNAVAILABLE when the server
stayed away past the budget, INFERENCE_FAILED when the server refused it), which the job writes to
its dead letters.

Results match the in-process handler's: one `PredictionResult` per image, in order, with
`inference={'weather': float32 [4], 'ground': float32 [13], 'model_version': '<N>'}` and
`model_id='PlanetModel/<N>'`, the version being the one the server says answered.

Usage:
  image_size, version = check_serving_model('tfserving:8500', use_tls=True)   # before the pipeline
  handler = KeyedModelHandler(ServingGrpcHandler('tfserving:8500', use_tls=True))
  predictions = keyed_images | RunInference(handler)
"""
import concurrent.futures
import dataclasses
import ipaddress
import logging
import random
import threading
import time
from typing import Any, Iterator, Optional, Sequence

import grpc
import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.base import RemoteModelHandler
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from beam_jobs.common import progress
from model import schema
from model.saved_model_info import signature_image_size
from model.errors import InputRefused
from model.errors import Reason

_log = logging.getLogger('planet.serving')

# gRPC's default limit on a received message. tensorflow_model_server raises its own to 2 GiB, but
# proxies, load balancers and servers started with --grpc_channel_arguments keep 4 MiB; staying
# under it works everywhere and keeps each call short.
GRPC_DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = GRPC_DEFAULT_MAX_MESSAGE_BYTES - 64 * 1024
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             grpc.StatusCode.DEADLINE_EXCEEDED})
# Model spec, map key, dtype and shape of a request: a few dozen bytes. The exact size is
# measured before sending; this only keeps the first plan close.
_REQUEST_OVERHEAD_BYTES = 512
# A channel whose server went away retries its connection on gRPC's backoff (1 s, then x1.6 up to
# 120 s); capped here so that a restarted server is found again within a couple of seconds.
_CHANNEL_OPTIONS = (
    ('grpc.initial_reconnect_backoff_ms', 200),
    ('grpc.min_reconnect_backoff_ms', 200),
    ('grpc.max_reconnect_backoff_ms', 2000),
)
# Beam's AdaptiveThrottler keeps plain lists; the sub-requests of a batch run on several threads.
_THROTTLE_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Transport (pure).

def parse_address(address: str) -> tuple[str, int]:
  """'host:port' or '[v6]:port' -> (host, port); a ValueError saying what is wrong otherwise."""
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'serving address {address!r} is not HOST:PORT (e.g. localhost:8500)')
  if host.startswith('['):
    if not host.endswith(']'):
      raise ValueError(f'serving address {address!r}: an IPv6 host goes in brackets, [::1]:8500')
    host = host[1:-1]
  elif ':' in host:
    raise ValueError(f'serving address {address!r}: write an IPv6 host in brackets, [::1]:8500')
  return host, int(port)


def is_loopback_host(host: str) -> bool:
  """True for localhost, 127.0.0.0/8 and ::1: names decided without a DNS lookup."""
  if host.lower().rstrip('.') == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def check_transport(address: str, *, use_tls: bool = False, allow_insecure: bool = False) -> str:
  """Decides how to reach `address`: 'tls' or 'insecure'; refuses plaintext beyond this machine.

  Raises:
    ValueError: a malformed address, both options at once, or plaintext to a host that is not
      loopback without `allow_insecure`.
  """
  host, _ = parse_address(address)
  if use_tls and allow_insecure:
    raise ValueError('use_tls (--tls) and allow_insecure (--allow_insecure) contradict each other; '
                     'pick one')
  if use_tls:
    return 'tls'
  if not allow_insecure and not is_loopback_host(host):
    raise ValueError(
        f'refusing a plaintext gRPC channel to {host}: it is not a loopback address, and the '
        'images would cross the network unencrypted. Use TLS (use_tls=True; --tls, with '
        '--root_cert FILE for a private CA) or, on a network you trust, allow it explicitly '
        '(allow_insecure=True; --allow_insecure).')
  return 'insecure'


def read_root_certificates(path: str) -> bytes:
  """A PEM file of trusted root certificates, from any path Beam can read (local, gs://)."""
  with FileSystems.open(path) as f:
    return f.read()


def open_channel(address: str, *, use_tls: bool = False, root_certificates: bytes | None = None,
                 tls_server_name: str | None = None, allow_insecure: bool = False) -> grpc.Channel:
  """A gRPC channel to `address`, over TLS or (loopback, or explicitly allowed) plaintext."""
  options = list(_CHANNEL_OPTIONS)
  if check_transport(address, use_tls=use_tls, allow_insecure=allow_insecure) == 'tls':
    if tls_server_name:
      options.append(('grpc.ssl_target_name_override', tls_server_name))
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.secure_channel(address, credentials, options=options)
  return grpc.insecure_channel(address, options=options)


# ---------------------------------------------------------------------------------------------
# Requests and responses (pure).

def image_problem(image: Any, image_size: int | None = None) -> str | None:
  """Why an element cannot be sent as a model input, or None."""
  if not isinstance(image, np.ndarray):
    return f'expected a numpy array, got {type(image).__name__}'
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != schema.CHANNELS:
    return f'expected uint8 [H, W, 3], got {image.dtype} {list(image.shape)}'
  if image_size is not None and image.shape[:2] != (image_size, image_size):
    return (f'image is {image.shape[0]}x{image.shape[1]}, the served model takes '
            f'{image_size}x{image_size}')
  return None


def plan_requests(images: Sequence[np.ndarray], max_request_bytes: int,
                  max_images_per_request: int) -> tuple[list[list[int]], list[int]]:
  """Groups image indices into requests: same shape, at most N images and B bytes each.

  Returns:
    (requests, too_large): index lists in input order, and the indices of images that exceed
    `max_request_bytes` on their own.
  """
  requests: list[list[int]] = []
  too_large: list[int] = []
  current: list[int] = []
  current_bytes = _REQUEST_OVERHEAD_BYTES
  for index, image in enumerate(images):
    size = image.nbytes
    if size + _REQUEST_OVERHEAD_BYTES > max_request_bytes:
      too_large.append(index)
      continue
    if current and (image.shape != images[current[0]].shape or
                    len(current) >= max_images_per_request or
                    current_bytes + size > max_request_bytes):
      requests.append(current)
      current, current_bytes = [], _REQUEST_OVERHEAD_BYTES
    current.append(index)
    current_bytes += size
  if current:
    requests.append(current)
  return requests, too_large


def encode_images(images: Sequence[np.ndarray]) -> tensor_pb2.TensorProto:
  """uint8 [N, H, W, 3] as one TensorProto with raw tensor_content (no per-pixel lists)."""
  stacked = np.ascontiguousarray(np.stack(images), dtype=np.uint8)
  proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8, tensor_content=stacked.tobytes())
  proto.tensor_shape.dim.extend(proto.tensor_shape.Dim(size=int(s)) for s in stacked.shape)
  return proto


def build_predict_request(images: Sequence[np.ndarray], model_name: str = schema.MODEL_NAME,
                          model_version: int | None = None,
                          signature: str = schema.SERVING_SIGNATURE) -> predict_pb2.PredictRequest:
  """A PredictRequest for a list of same-shaped uint8 images."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model_name
  request.model_spec.signature_name = signature
  if model_version is not None:
    request.model_spec.version.value = model_version
  request.inputs[schema.INPUT_IMAGES].CopyFrom(encode_images(images))
  request.output_filter.extend(schema.OUTPUT_NAMES)
  return request


def split_response(response: predict_pb2.PredictResponse,
                   count: int) -> tuple[int, list[dict[str, np.ndarray]]]:
  """(version, one {'weather', 'ground'} dict per image) from a Predict answer for `count` images."""
  widths = {schema.OUTPUT_WEATHER: schema.NUM_WEATHER, schema.OUTPUT_GROUND: schema.NUM_GROUND}
  outputs = {}
  for name, width in widths.items():
    if name not in response.outputs:
      raise ValueError(f'the answer has no output {name!r} (it has {sorted(response.outputs)})')
    # TF's own reader: tensor_content or the typed *_val fields, a short field filled.
    array = tf.make_ndarray(response.outputs[name]).astype(np.float32, copy=False)
    if array.shape != (count, width):
      raise ValueError(f'output {name!r} has shape {list(array.shape)}, expected [{count}, {width}]')
    outputs[name] = array
  rows = [{name: outputs[name][i].copy() for name in widths} for i in range(count)]
  return int(response.model_spec.version.value), rows


def is_transient(code: grpc.StatusCode, details: str = '') -> bool:
  """Worth retrying: the server may answer later. An over-size refusal never will."""
  if code == grpc.StatusCode.RESOURCE_EXHAUSTED and 'larger than max' in (details or ''):
    return False
  return code in TRANSIENT_CODES


def may_be_one_image(code: grpc.StatusCode) -> bool:
  """Whether a refused request is worth re-sending image by image: the fault may lie in one input.

  NOT_FOUND, FAILED_PRECONDITION, PERMISSION_DENIED and the like concern the model or the caller,
  and would only be repeated once per image.
  """
  return code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL,
                  grpc.StatusCode.UNKNOWN, grpc.StatusCode.OUT_OF_RANGE,
                  grpc.StatusCode.RESOURCE_EXHAUSTED)


def backoff_delays(initial_secs: float, max_secs: float, rng: random.Random) -> Iterator[float]:
  """Endless exponential delays (x2, capped), each jittered down by up to half so workers spread out."""
  delay = initial_secs
  while True:
    yield delay * rng.uniform(0.5, 1.0)
    delay = min(max_secs, delay * 2)


# ---------------------------------------------------------------------------------------------
# Checking the served model before the pipeline starts.

def served_image_size(signature_map: get_model_metadata_pb2.SignatureDefMap, signature: str,
                      where: str, image_size: int | None = None) -> int:
  """The H (= W) of a served signature (GetModelMetadata's map), checked like an export on disk."""
  return signature_image_size(signature_map.signature_def, signature, where, image_size)


def _served_versions(channel: grpc.Channel, model_name: str, timeout_secs: float) -> str:
  """'versions 3 (AVAILABLE), 2 (END)' from GetModelStatus, or why they could not be listed."""
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = model_name
  try:
    response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        request, timeout=timeout_secs)
  except grpc.RpcError as error:
    return f'no versions ({error.code().name}: {error.details()})'
  states = get_model_status_pb2.ModelVersionStatus.State
  return 'versions ' + ', '.join(f'{s.version} ({states.Name(s.state)})'
                                 for s in response.model_version_status)


def check_serving_model(address: str, model_name: str = schema.MODEL_NAME,
                        model_version: int | None = None,
                        signature: str = schema.SERVING_SIGNATURE, *,
                        image_size: int | None = None, use_tls: bool = False,
                        root_certificates: bytes | None = None,
                        tls_server_name: str | None = None, allow_insecure: bool = False,
                        timeout_secs: float = 10.0) -> tuple[int, int]:
  """Asks the server for the model's metadata and checks it fits; returns (image_size, version).

  Call it before building the pipeline: a wrong address, model name, version, signature or input
  fails here with a message instead of as dead letters for every image. The call waits up to
  `timeout_secs` for a server that is still starting.

  Raises:
    ValueError: naming what was expected and what was found.
  """
  channel = open_channel(address, use_tls=use_tls, root_certificates=root_certificates,
                         tls_server_name=tls_server_name, allow_insecure=allow_insecure)
  wanted = f'{model_name} version {model_version}' if model_version is not None else (
      f'{model_name} (latest version)')
  try:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=['signature_def'])
    request.model_spec.name = model_name
    if model_version is not None:
      request.model_spec.version.value = model_version
    try:
      response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
          request, timeout=timeout_secs, wait_for_ready=True)
    except grpc.RpcError as error:
      code, details = error.code(), error.details()
      if code == grpc.StatusCode.NOT_FOUND:
        raise ValueError(
            f'{address} does not serve {wanted} ({details}); for model {model_name!r} it has '
            f'{_served_versions(channel, model_name, timeout_secs)}') from None
      if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise ValueError(
            f'no TF Serving answered at {address} within {timeout_secs:g}s ({code.name}: '
            f'{details}); start one (README: "Serving with TensorFlow Serving") or fix the '
            'address') from None
      raise ValueError(f'{address} refused the metadata request for {wanted}: '
                       f'{code.name}: {details}') from None
  finally:
    channel.close()
  found_name, found_version = response.model_spec.name, response.model_spec.version.value
  if found_name != model_name:
    raise ValueError(f'{address} answered for model {found_name!r}; expected {model_name!r}')
  if model_version is not None and found_version != model_version:
    raise ValueError(f'{address} answered with version {found_version}; expected {model_version}')
  signature_map = get_model_metadata_pb2.SignatureDefMap()
  if 'signature_def' not in response.metadata or not response.metadata['signature_def'].Unpack(
      signature_map):
    raise ValueError(f'{address} sent no signature_def metadata for {wanted}')
  where = f'{model_name} version {found_version} at {address}'
  return served_image_size(signature_map, signature, where, image_size), found_version


# ---------------------------------------------------------------------------------------------
# The handler.

class ServingClient:
  """What `create_client` makes on a worker: one channel, its stub, threads for requests in flight."""

  def __init__(self, address: str, channel: grpc.Channel, max_requests_in_flight: int):
    self.address = address
    self.channel = channel
    self.stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_requests_in_flight,
                                                      thread_name_prefix='planet-grpc')

  def close(self) -> None:
    self.pool.shutdown(wait=False)
    self.channel.close()


class _GaveUp(Exception):
  """Transient failures outlasted the retry budget."""


@dataclasses.dataclass
class _Tally:
  """What the calls for one batch did; counted on the bundle's thread (Beam metrics are per thread)."""
  requests: int = 0
  retries: int = 0
  single_image_requests: int = 0
  throttled_secs: float = 0.0
  request_bytes: list[int] = dataclasses.field(default_factory=list)

  def add(self, other: '_Tally') -> None:
    self.requests += other.requests
    self.retries += other.retries
    self.single_image_requests += other.single_image_requests
    self.throttled_secs += other.throttled_secs
    self.request_bytes.extend(other.request_bytes)


def _never_retry(_: Exception) -> bool:
  return False


class ServingGrpcHandler(RemoteModelHandler[np.ndarray, PredictionResult, ServingClient]):
  """Predicts uint8 [H, W, 3] images with a model served by TensorFlow Serving, over gRPC.

  Beam's own retry in `RemoteModelHandler.run_inference` is switched off (`num_retries=0`): it
  would re-send a whole batch starting after 5 s, and raise at the end. Retries here are per
  request instead, and an image still without an answer becomes an `InputRefused`.

  Args:
    address: HOST:PORT of the server.
    model_name, model_version, signature: what to ask for (no version: the latest).
    use_tls, root_certificates, tls_server_name, allow_insecure: the transport, see
      `check_transport`; `root_certificates` is PEM bytes (`read_root_certificates`), carried to
      the workers inside the handler.
    image_size: when given, images of another size are refused without a request.
    max_request_bytes: the largest serialized request sent (default 4 MiB less 64 KiB).
    max_images_per_request: fewer, smaller requests spread a batch over the threads.
    max_requests_in_flight: threads per worker process sending requests at once.
    timeout_secs: the deadline of every call.
    retry_budget_secs: how long after its first transient failure a request is retried; the
      default rides out a server restart.
    initial_backoff_secs, max_backoff_secs: the backoff between retries (doubling, jittered).
    min_batch_size, max_batch_size, max_batch_duration_secs: for Beam's BatchElements.
    throttle_delay_secs, overload_ratio: Beam's client-side throttling (the SRE book's K).
  """

  def __init__(self, address: str, *, model_name: str = schema.MODEL_NAME,
               model_version: int | None = None, signature: str = schema.SERVING_SIGNATURE,
               use_tls: bool = False, root_certificates: bytes | None = None,
               tls_server_name: str | None = None, allow_insecure: bool = False,
               image_size: int | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_images_per_request: int = 32, max_requests_in_flight: int = 4,
               timeout_secs: float = 30.0, retry_budget_secs: float = 30.0,
               initial_backoff_secs: float = 0.25, max_backoff_secs: float = 4.0,
               min_batch_size: int = 1, max_batch_size: int = 128,
               max_batch_duration_secs: int | None = None,
               throttle_delay_secs: float = 1.0, overload_ratio: float = 2.0):
    check_transport(address, use_tls=use_tls, allow_insecure=allow_insecure)
    if max_request_bytes <= _REQUEST_OVERHEAD_BYTES:
      raise ValueError(f'max_request_bytes must exceed {_REQUEST_OVERHEAD_BYTES}')
    for name, value in (('max_images_per_request', max_images_per_request),
                        ('max_requests_in_flight', max_requests_in_flight),
                        ('min_batch_size', min_batch_size), ('timeout_secs', timeout_secs),
                        ('initial_backoff_secs', initial_backoff_secs)):
      if value <= 0:
        raise ValueError(f'{name} must be positive, got {value}')
    if max_batch_size < min_batch_size:
      raise ValueError(f'max_batch_size {max_batch_size} < min_batch_size {min_batch_size}')
    if retry_budget_secs < 0 or max_backoff_secs < initial_backoff_secs:
      raise ValueError('need retry_budget_secs >= 0 and max_backoff_secs >= initial_backoff_secs')
    super().__init__(namespace=progress.METRICS_NAMESPACE, num_retries=0,
                     throttle_delay_secs=throttle_delay_secs, retry_filter=_never_retry,
                     overload_ratio=overload_ratio)
    self._address = address
    self._model_name = model_name
    self._model_version = model_version
    self._signature = signature
    self._use_tls = use_tls
    self._root_certificates = root_certificates
    self._tls_server_name = tls_server_name
    self._allow_insecure = allow_insecure
    self._image_size = image_size
    self._max_request_bytes = max_request_bytes
    self._max_images_per_request = max_images_per_request
    self._max_requests_in_flight = max_requests_in_flight
    self._timeout_secs = timeout_secs
    self._retry_budget_secs = retry_budget_secs
    self._initial_backoff_secs = initial_backoff_secs
    self._max_backoff_secs = max_backoff_secs
    self._batching = {'min_batch_size': min_batch_size, 'max_batch_size': max_batch_size}
    if max_batch_duration_secs is not None:
      self._batching['max_batch_duration_secs'] = max_batch_duration_secs

  def create_client(self) -> ServingClient:
    channel = open_channel(self._address, use_tls=self._use_tls,
                           root_certificates=self._root_certificates,
                           tls_server_name=self._tls_server_name,
                           allow_insecure=self._allow_insecure)
    return ServingClient(self._address, channel, self._max_requests_in_flight)

  def batch_elements_kwargs(self) -> dict[str, Any]:
    return dict(self._batching)

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    # Beam's default pickles the whole batch just to measure it.
    return sum(getattr(image, 'nbytes', 0) for image in batch)

  def validate_inference_args(self, inference_args: Optional[dict[str, Any]]) -> None:
    if inference_args:
      raise ValueError(f'ServingGrpcHandler takes no inference_args, got {sorted(inference_args)}')

  def request(self, batch: Sequence[np.ndarray], model: ServingClient,
              inference_args: Optional[dict[str, Any]] = None) -> list[PredictionResult]:
    """One PredictionResult per image, in order; never raises for a server that is away or refuses."""
    answers: list[tuple[Any, str | None] | None] = [None] * len(batch)
    sendable = []
    for index, image in enumerate(batch):
      problem = image_problem(image, self._image_size)
      if problem:
        answers[index] = (InputRefused(Reason.INFERENCE_FAILED, problem), None)
      else:
        sendable.append(index)
    groups, too_large = plan_requests([batch[i] for i in sendable], self._max_request_bytes,
                                      self._max_images_per_request)
    for position in too_large:
      index = sendable[position]
      answers[index] = (InputRefused(
          Reason.INFERENCE_FAILED, f'image of {batch[index].nbytes} bytes does not fit a request '
          f'of max_request_bytes={self._max_request_bytes}'), None)
    groups = [[sendable[position] for position in group] for group in groups]
    futures = [model.pool.submit(self._predict_group, model, [batch[i] for i in group])
               for group in groups]
    tally = _Tally()
    for group, future in zip(groups, futures):
      group_answers, group_tally = future.result()
      tally.add(group_tally)
      for index, answer in zip(group, group_answers):
        answers[index] = answer
    self._count(tally, answers)
    return [PredictionResult(example=image, inference=inference, model_id=model_id)
            for image, (inference, model_id) in zip(batch, answers)]

  def _predict_group(self, client: ServingClient,
                     images: list[np.ndarray]) -> tuple[list[tuple[Any, str | None]], _Tally]:
    """Answers for one request's images; on a non-transient refusal, image by image."""
    tally = _Tally()
    request = build_predict_request(images, self._model_name, self._model_version, self._signature)
    try:
      response = self._call(client, request, tally)
      version, rows = split_response(response, len(images))
    except _GaveUp as gave_up:
      return [(InputRefused(Reason.UNAVAILABLE, str(gave_up)), None)] * len(images), tally
    except grpc.RpcError as error:
      message = f'{client.address}: {error.code().name}: {error.details()}'
      if len(images) == 1 or not may_be_one_image(error.code()):
        return [(InputRefused(Reason.INFERENCE_FAILED, message), None)] * len(images), tally
      _log.warning('serving: a request of %d images was refused (%s); sending them one by one',
                   len(images), message)
      answers = []
      for image in images:
        (answer,), single_tally = self._predict_group(client, [image])
        single_tally.single_image_requests += 1
        tally.add(single_tally)
        answers.append(answer)
      return answers, tally
    except ValueError as error:
      # The answer breaks the output contract: no image of this request can be trusted.
      message = f'{client.address}: unusable answer: {error}'
      return [(InputRefused(Reason.INFERENCE_FAILED, message), None)] * len(images), tally
    model_id = f'{self._model_name}/{version}'
    return [({**row, 'model_version': str(version)}, model_id) for row in rows], tally

  def _call(self, client: ServingClient, request: predict_pb2.PredictRequest,
            tally: _Tally) -> predict_pb2.PredictResponse:
    """One Predict, retried on transient codes until the budget runs out (then `_GaveUp`)."""
    size = request.ByteSize()
    delays = backoff_delays(self._initial_backoff_secs, self._max_backoff_secs, random.Random())
    first_failure = None
    attempts = 0
    while True:
      give_up_at = None if first_failure is None else first_failure + self._retry_budget_secs
      waited, throttled = self._wait_while_throttled(give_up_at)
      tally.throttled_secs += waited
      if throttled:
        raise _GaveUp(self._gave_up_message(client, error, attempts, first_failure,
                                            'then throttled client-side'))
      attempts += 1
      tally.requests += 1
      tally.request_bytes.append(size)
      sent_at = time.time()
      try:
        response = client.stub.Predict(request, timeout=self._timeout_secs)
      except grpc.RpcError as failure:
        if not is_transient(failure.code(), failure.details()):
          raise
        error = failure
        now = time.monotonic()
        if first_failure is None:
          first_failure = now
        delay = next(delays)
        if now + delay - first_failure > self._retry_budget_secs:
          raise _GaveUp(self._gave_up_message(client, error, attempts, first_failure)) from None
        tally.retries += 1
        time.sleep(delay)
        continue
      with _THROTTLE_LOCK:
        self.throttler.successful_request(sent_at * 1000)
      return response

  def _gave_up_message(self, client: ServingClient, error: grpc.RpcError, attempts: int,
                       first_failure: float, note: str = '') -> str:
    return (f'{client.address}: {error.code().name} after {attempts} attempt(s) over '
            f'{time.monotonic() - first_failure:.1f}s{", " + note if note else ""} (retry budget '
            f'{self._retry_budget_secs:g}s): {error.details()}')

  def _wait_while_throttled(self, give_up_at: float | None) -> tuple[float, bool]:
    """Beam's throttle(), with its bookkeeping under a lock and the sleep outside it.

    Returns (seconds waited, whether `give_up_at` (monotonic) passed while still throttled).
    """
    waited = 0.0
    while True:
      with _THROTTLE_LOCK:
        throttled = self.throttler.throttle_request(time.time() * 1000)
      if not throttled:
        return waited, False
      if give_up_at is not None and time.monotonic() >= give_up_at:
        return waited, True
      time.sleep(self.throttler.throttle_delay_secs)
      waited += self.throttler.throttle_delay_secs

  def _count(self, tally: _Tally, answers) -> None:
    refused = [inference.reason for inference, _ in answers if isinstance(inference, InputRefused)]
    progress.counter('grpc_requests').inc(tally.requests)
    progress.counter('grpc_retries').inc(tally.retries)
    progress.counter('grpc_single_image_requests').inc(tally.single_image_requests)
    progress.counter('grpc_predicted_images').inc(len(answers) - len(refused))
    progress.counter('grpc_unavailable_images').inc(refused.count(Reason.UNAVAILABLE))
    progress.counter('grpc_failed_images').inc(refused.count(Reason.INFERENCE_FAILED))
    request_bytes = Metrics.distribution(progress.METRICS_NAMESPACE, 'grpc_request_bytes')
    for size in tally.request_bytes:
      request_bytes.update(size)
    if tally.throttled_secs:
      progress.counter('grpc_throttled_ms').inc(int(tally.throttled_secs * 1000))
      self.throttler.throttling_signaler.signal_throttled(int(tally.throttled_secs))
