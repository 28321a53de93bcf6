"""The gRPC backend of the prediction job: a Beam ModelHandler that asks TensorFlow Serving.

`ServingGrpcHandler` is a `RemoteModelHandler`: Beam batches the images, and each batch becomes
several `tensorflow.serving.PredictRequest`s (uint8 tensors, 32 images each by default, every
request under `max_request_bytes`) streamed over one channel: `max_requests_in_flight` at a time,
the next one sent as each answer comes back. A RunInference batch is 16 requests by default, so
the server is kept busy for the whole batch (while the job's decode threads prepare the next one)
and idles only at its end, while the job writes the batch's rows. Each call has a deadline; calls that
fail with a transient code (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) are retried with
jittered exponential backoff for up to `retry_budget_secs`, behind a client-side throttler
(retry_policy.AnsweredRequestsThrottler).
A request refused for a reason that may lie in one image (INVALID_ARGUMENT, INTERNAL, ...) is
re-sent image by image, so one bad image never takes its batch down. Nothing is raised for an
image that cannot be predicted: it comes back as an `InputRefused` (UNAVAILABLE when the server
stayed away past the budget, INFERENCE_FAILED when the server refused it), which the job writes to
its dead letters. The messages are `model.serving.protocol`'s, which the local test server speaks
too; the retry rules are `beam_jobs.predict.backends.retry_policy`'s.

Results match the in-process handler's: one `PredictionResult` per image, in order, with
`inference={'weather': float32 [4], 'ground': float32 [13], 'model_version': '<N>'}` and
`model_id='PlanetModel/<N>'`, the version being the one the server says answered.

Usage:
  image_size, version = check_serving_model('tfserving:8500', use_tls=True)   # before the pipeline
  handler = KeyedModelHandler(ServingGrpcHandler('tfserving:8500', use_tls=True))
  predictions = keyed_images | RunInference(handler)
"""
import concurrent.futures
import logging
from typing import Any, Optional, Sequence

import grpc
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.base import RemoteModelHandler
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from beam_jobs.common import progress
from beam_jobs.predict.backends import model_id, prediction
from beam_jobs.predict.backends.retry_policy import CallTally
from beam_jobs.predict.backends.retry_policy import GaveUp
from beam_jobs.predict.backends.retry_policy import AnsweredRequestsThrottler, RetryPolicy
from beam_jobs.predict.backends.retry_policy import may_be_one_image
from beam_jobs.predict.backends.serving_address import HTTP1
from beam_jobs.predict.backends.serving_address import answering_protocol
from beam_jobs.predict.backends.serving_address import check_serving_address
from beam_jobs.predict.backends.serving_address import grpc_port_message
from model import schema
from model.errors import InputRefused
from model.errors import Reason
from model.saved_model_info import signature_image_size
from model.serving.protocol import GRPC_DEFAULT_MAX_MESSAGE_BYTES
from model.serving.protocol import METADATA_FIELD
from model.serving.protocol import build_predict_request
from model.serving.protocol import check_transport
from model.serving.protocol import open_channel
from model.serving.protocol import split_response

__all__ = ['DEFAULT_MAX_REQUEST_BYTES', 'REQUESTS_PER_BATCH', 'ServingClient', 'ServingGrpcHandler',
           'check_serving_model', 'image_problem', 'plan_requests', 'read_root_certificates',
           'served_image_size', 'wanted_model']

_log = logging.getLogger('planet.serving')

# Below gRPC's default limit (model.serving.protocol says why), with room for the request's framing.
DEFAULT_MAX_REQUEST_BYTES = GRPC_DEFAULT_MAX_MESSAGE_BYTES - 64 * 1024
# Requests per RunInference batch by default. Within a batch, requests stream (a new one leaves as
# each answer comes back); only at a batch's end is nothing in flight while the job handles its
# rows. With batches of 64 (2 requests), py-spy found the job's main thread waiting on answers in
# about three quarters of its samples while the pipeline ran. 16 requests of 32 images: 512
# images, 25 MB at 128 px.
REQUESTS_PER_BATCH = 16
# Model spec, map key, dtype and shape of a request: a few dozen bytes. The exact size is
# measured before sending; this only keeps the first plan close.
_REQUEST_OVERHEAD_BYTES = 512
# The client-side throttler's window (Beam's RemoteModelHandler default): a server back from a
# restart is no longer held back a second after its last failure.
_THROTTLE_WINDOW_MS = 1000


def read_root_certificates(path: str) -> bytes:
  """A PEM file of trusted root certificates, from any path Beam can read (local, gs://)."""
  with FileSystems.open(path) as f:
    return f.read()


# ---------------------------------------------------------------------------------------------
# Planning requests (pure).

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


def wanted_model(model_name: str, model_version: int | None, label: str | None) -> str:
  """'PlanetModel version 3', 'PlanetModel label stable' or 'PlanetModel (latest version)'."""
  if model_version is not None and label is not None:
    raise ValueError(f'ask for a version ({model_version}) or a version label ({label!r}), not '
                     'both: TF Serving\'s ModelSpec holds one of them')
  if label is not None:
    return f'{model_name} label {label}'
  return (f'{model_name} version {model_version}' if model_version is not None else
          f'{model_name} (latest version)')


def check_serving_model(address: str, model_name: str = schema.MODEL_NAME,
                        model_version: int | None = None,
                        signature: str = schema.SERVING_SIGNATURE, *,
                        image_size: int | None = None, use_tls: bool = False,
                        root_certificates: bytes | None = None,
                        tls_server_name: str | None = None, allow_insecure: bool = False,
                        timeout_secs: float = 10.0,
                        model_version_label: str | None = None) -> tuple[int, int]:
  """Asks the server for the model's metadata and checks it fits; returns (image_size, version).

  Call it before building the pipeline: a wrong address, model name, version, signature or input
  fails here with a message instead of as dead letters for every image. The call waits up to
  `timeout_secs` for a server that is still starting; when none answered, a short probe tells
  whether an HTTP/1 server (TF Serving's REST port) is there (`serving_address`).

  Raises:
    ValueError: naming what was expected and what was found.
  """
  check_serving_address(address)
  wanted = wanted_model(model_name, model_version, model_version_label)
  channel = open_channel(address, use_tls=use_tls, root_certificates=root_certificates,
                         tls_server_name=tls_server_name, allow_insecure=allow_insecure)
  try:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[METADATA_FIELD])
    request.model_spec.name = model_name
    if model_version is not None:
      request.model_spec.version.value = model_version
    if model_version_label is not None:
      request.model_spec.version_label = model_version_label
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
        if answering_protocol(address, use_tls=use_tls, root_certificates=root_certificates,
                              server_name=tls_server_name) == HTTP1:
          raise ValueError(grpc_port_message(address)) from None
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
  if METADATA_FIELD not in response.metadata or not response.metadata[METADATA_FIELD].Unpack(
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
    model_version_label: ask for the version this label names instead (ModelSpec.version_label,
      resolved by the server on every request; each answer says which version it was).
    use_tls, root_certificates, tls_server_name, allow_insecure: the transport, see
      `model.serving.protocol.check_transport`; `root_certificates` is PEM bytes (`read_root_certificates`), carried to
      the workers inside the handler.
    image_size: when given, images of another size are refused without a request.
    max_request_bytes: the largest serialized request sent (default 4 MiB less 64 KiB).
    max_images_per_request: fewer, smaller requests spread a batch over the threads.
    max_requests_in_flight: threads per worker process sending requests at once.
    timeout_secs: the deadline of every call.
    retry_budget_secs: how long after its first transient failure a request is retried; the
      default rides out a server restart.
    initial_backoff_secs, max_backoff_secs: the backoff between retries (doubling, jittered);
      these four make the handler's `serving_retry.RetryPolicy`.
    min_batch_size, max_batch_size, max_batch_duration_secs: for Beam's BatchElements; the
      default max_batch_size is `REQUESTS_PER_BATCH` full requests, and min_batch_size the same
      (BatchElements' own sizing aims at 5% per-batch overhead, which for a remote call of
      ~2 ms per image settles near 100 images: 3 requests, the last one partial).
    throttle_delay_secs, overload_ratio: Beam's client-side throttling (the SRE book's K).
  """
  # The Beam counters' names: grpc_requests, grpc_retries, ... (the REST handler's: rest_...).
  COUNTER_PREFIX = 'grpc_'

  def __init__(self, address: str, *, model_name: str = schema.MODEL_NAME,
               model_version: int | None = None, signature: str = schema.SERVING_SIGNATURE,
               use_tls: bool = False, root_certificates: bytes | None = None,
               tls_server_name: str | None = None, allow_insecure: bool = False,
               image_size: int | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_images_per_request: int = 32, max_requests_in_flight: int = 4,
               timeout_secs: float = 30.0, retry_budget_secs: float = 30.0,
               initial_backoff_secs: float = 0.25, max_backoff_secs: float = 4.0,
               min_batch_size: int | None = None, max_batch_size: int | None = None,
               max_batch_duration_secs: int | None = None,
               throttle_delay_secs: float = 1.0, overload_ratio: float = 2.0,
               model_version_label: str | None = None):
    check_serving_address(address)
    wanted_model(model_name, model_version, model_version_label)
    check_transport(address, use_tls=use_tls, allow_insecure=allow_insecure)
    if max_batch_size is None:
      max_batch_size = max(min_batch_size or 1, max_images_per_request * REQUESTS_PER_BATCH)
    if min_batch_size is None:
      min_batch_size = max_batch_size
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
    # Beam's window and K, but attempts counted as they are answered (see the class).
    self.throttler = AnsweredRequestsThrottler(
        window_ms=_THROTTLE_WINDOW_MS, bucket_ms=_THROTTLE_WINDOW_MS, overload_ratio=overload_ratio,
        namespace=progress.METRICS_NAMESPACE, throttle_delay_secs=throttle_delay_secs)
    self._address = address
    self._model_name = model_name
    self._model_version = model_version
    self._model_version_label = model_version_label
    self._signature = signature
    self._use_tls = use_tls
    self._root_certificates = root_certificates
    self._tls_server_name = tls_server_name
    self._allow_insecure = allow_insecure
    self._image_size = image_size
    self._max_request_bytes = max_request_bytes
    self._max_images_per_request = max_images_per_request
    self._max_requests_in_flight = max_requests_in_flight
    self._retry = RetryPolicy(timeout_secs, retry_budget_secs, initial_backoff_secs,
                              max_backoff_secs)
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
    tally = CallTally()
    for group, future in zip(groups, futures):
      group_answers, group_tally = future.result()
      tally.add(group_tally)
      for index, answer in zip(group, group_answers):
        answers[index] = answer
    self._count(tally, answers)
    return [PredictionResult(example=image, inference=inference, model_id=model_id)
            for image, (inference, model_id) in zip(batch, answers)]

  def _predict_group(self, client: ServingClient,
                     images: list[np.ndarray]) -> tuple[list[tuple[Any, str | None]], CallTally]:
    """Answers for one request's images; on a non-transient refusal, image by image."""
    tally = CallTally()
    request = build_predict_request(images, self._model_name, self._model_version, self._signature,
                                    self._model_version_label)
    try:
      response = self._call(client, request, tally)
      version, rows = split_response(response, len(images))
    except GaveUp as gave_up:
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
    answered_by = model_id(self._model_name, str(version))
    return [(prediction(row[schema.OUTPUT_WEATHER], row[schema.OUTPUT_GROUND], str(version)),
             answered_by) for row in rows], tally

  def _call(self, client: ServingClient, request: predict_pb2.PredictRequest,
            tally: CallTally) -> predict_pb2.PredictResponse:
    """One Predict, retried on transient codes until the budget runs out (then `GaveUp`)."""
    return self._retry.call(client.stub.Predict, request, throttler=self.throttler, tally=tally,
                            address=client.address)

  def _count(self, tally: CallTally, answers) -> None:
    refused = [inference.reason for inference, _ in answers if isinstance(inference, InputRefused)]
    prefix = self.COUNTER_PREFIX
    progress.counter(f'{prefix}requests').inc(tally.requests)
    progress.counter(f'{prefix}retries').inc(tally.retries)
    progress.counter(f'{prefix}single_image_requests').inc(tally.single_image_requests)
    progress.counter(f'{prefix}predicted_images').inc(len(answers) - len(refused))
    progress.counter(f'{prefix}unavailable_images').inc(refused.count(Reason.UNAVAILABLE))
    progress.counter(f'{prefix}failed_images').inc(refused.count(Reason.INFERENCE_FAILED))
    request_bytes = Metrics.distribution(progress.METRICS_NAMESPACE, f'{prefix}request_bytes')
    for size in tally.request_bytes:
      request_bytes.update(size)
    if tally.throttled_secs:
      progress.counter(f'{prefix}throttled_ms').inc(int(tally.throttled_secs * 1000))
      self.throttler.throttling_signaler.signal_throttled(int(tally.throttled_secs))
