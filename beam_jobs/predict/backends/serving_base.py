"""The TF Serving backends' one handler: Beam batching, requests, retries and rows over a transport.

`ServingHandler` is a `RemoteModelHandler` that knows TF Serving's rules but not its wire: Beam
batches the images, and each batch becomes several requests (32 images each by default, every
request under `max_request_bytes`) sent `max_requests_in_flight` at a time, the next one as each
answer comes back. A RunInference batch is `REQUESTS_PER_BATCH` requests by default, so the server
is kept busy for the whole batch and idles only at its end, while the job writes the batch's
rows. Each call has a deadline; calls that fail with a transient code (UNAVAILABLE,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) are retried with jittered exponential backoff for up to
`retry_budget_secs`, behind a client-side throttler (`retry_policy`). A request refused for a
reason that may lie in one image (INVALID_ARGUMENT, INTERNAL, ...) is re-sent image by image, so
one bad image never takes its batch down. Nothing is raised for an image that cannot be predicted:
it comes back as an `InputRefused` (UNAVAILABLE when the server stayed away past the budget,
INFERENCE_FAILED when the server refused it), which the job writes to its dead letters.

A `transport.Transport` is the wire (`tf_serving.GrpcTransport`, `tf_serving_rest.RestTransport`):
it turns images into a request, sends it, and reads the answer into `(version, {output: array})`,
and says what its failures mean (`retry_policy.CallFailed`). The start-up check over either one
is `serving_check`'s.

Results match the in-process handler's: one `PredictionResult` per image, in order, with
`inference=prediction(weather, ground, '<N>')` and `model_id='PlanetModel/<N>'`, the version
being the one that answered.

Usage:
  image_size, version = serving_check.check_served_model(transport)   # before the pipeline
  handler = KeyedModelHandler(ServingHandler(transport, image_size=image_size))
  predictions = keyed_images | RunInference(handler)
"""
import concurrent.futures
import logging
from typing import Any, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.base import RemoteModelHandler

from beam_jobs.common import metrics
from beam_jobs.predict.backends import model_id, prediction
from beam_jobs.predict.backends.retry_policy import AnsweredRequestsThrottler, RetryPolicy
from beam_jobs.predict.backends.retry_policy import CallFailed
from beam_jobs.predict.backends.retry_policy import CallTally
from beam_jobs.predict.backends.retry_policy import GaveUp
from beam_jobs.predict.backends.retry_policy import may_be_one_image
from beam_jobs.predict.backends.transport import ServedModel, Transport
from model import schema
from model.errors import InputRefused
from model.errors import Reason
from model.serving.protocol import GRPC_DEFAULT_MAX_MESSAGE_BYTES

__all__ = ['DEFAULT_MAX_REQUEST_BYTES', 'REQUESTS_PER_BATCH', 'ServingClient', 'ServingHandler',
           'image_problem', 'plan_requests']

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
_OUTPUT_WIDTHS = {schema.OUTPUT_WEATHER: schema.NUM_WEATHER,
                  schema.OUTPUT_GROUND: schema.NUM_GROUND}


# ---------------------------------------------------------------------------------------------
# Planning requests and reading answers (pure).

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


def _image_rows(version: int, outputs: dict[str, np.ndarray], count: int) -> list[dict]:
  """One `prediction(...)` per image from an answer's [count, width] outputs.

  Raises:
    ValueError: an output has another shape than [count, width].
  """
  arrays = {}
  for name, width in _OUTPUT_WIDTHS.items():
    array = np.asarray(outputs[name]).astype(np.float32, copy=False)
    if array.shape != (count, width):
      raise ValueError(f'output {name!r} has shape {list(array.shape)}, '
                       f'expected [{count}, {width}]')
    arrays[name] = array
  weather, ground = arrays[schema.OUTPUT_WEATHER], arrays[schema.OUTPUT_GROUND]
  # Copies: a row must not keep its whole request's outputs alive.
  return [prediction(weather[i].copy(), ground[i].copy(), str(version)) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# The handler.

class ServingClient:
  """What `create_client` makes on a worker: the transport's connection, threads for requests."""

  def __init__(self, connection: Any, max_requests_in_flight: int, thread_name_prefix: str):
    self.connection = connection
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_requests_in_flight,
                                                      thread_name_prefix=thread_name_prefix)

  def close(self) -> None:
    self.pool.shutdown(wait=False)
    self.connection.close()


def _never_retry(_: Exception) -> bool:
  return False


class ServingHandler(RemoteModelHandler[np.ndarray, PredictionResult, ServingClient]):
  """Predicts uint8 [H, W, 3] images with a model served by TensorFlow Serving, over a transport.

  Beam's own retry in `RemoteModelHandler.run_inference` is switched off (`num_retries=0`): it
  would re-send a whole batch starting after 5 s, and raise at the end. Retries here are per
  request instead, and an image still without an answer becomes an `InputRefused`.

  Args:
    transport: the wire (`Transport`).
    model_name, model_version, signature: what to ask for (no version: the latest).
    model_version_label: ask for the version this label names instead.
    image_size: when given, images of another size are refused without a request.
    max_request_bytes: the largest request sent (default 4 MiB less 64 KiB), as the transport
      counts it.
    max_images_per_request: fewer, smaller requests spread a batch over the threads.
    max_requests_in_flight: threads per worker process sending requests at once.
    timeout_secs: the deadline of every call.
    retry_budget_secs: how long after its first transient failure a request is retried; the
      default rides out a server restart.
    initial_backoff_secs, max_backoff_secs: the backoff between retries (doubling, jittered);
      these four make the handler's `retry_policy.RetryPolicy`.
    min_batch_size, max_batch_size, max_batch_duration_secs: for Beam's BatchElements; the
      default max_batch_size is `REQUESTS_PER_BATCH` full requests, and min_batch_size the same
      (BatchElements' own sizing aims at 5% per-batch overhead, which for a remote call of
      ~2 ms per image settles near 100 images: 3 requests, the last one partial).
    throttle_delay_secs, overload_ratio: Beam's client-side throttling (the SRE book's K).
  """

  def __init__(self, transport: Transport, *, model_name: str = schema.MODEL_NAME,
               model_version: int | None = None, signature: str = schema.SERVING_SIGNATURE,
               model_version_label: str | None = None, image_size: int | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_images_per_request: int = 32, max_requests_in_flight: int = 4,
               timeout_secs: float = 30.0, retry_budget_secs: float = 30.0,
               initial_backoff_secs: float = 0.25, max_backoff_secs: float = 4.0,
               min_batch_size: int | None = None, max_batch_size: int | None = None,
               max_batch_duration_secs: int | None = None,
               throttle_delay_secs: float = 1.0, overload_ratio: float = 2.0):
    self._model = ServedModel(model_name, model_version, model_version_label, signature)
    max_request_bytes = transport.image_bytes_within(max_request_bytes)
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
    super().__init__(namespace=metrics.METRICS_NAMESPACE, num_retries=0,
                     throttle_delay_secs=throttle_delay_secs, retry_filter=_never_retry,
                     overload_ratio=overload_ratio)
    # Beam's window and K, but attempts counted as they are answered (see the class).
    self.throttler = AnsweredRequestsThrottler(
        window_ms=_THROTTLE_WINDOW_MS, bucket_ms=_THROTTLE_WINDOW_MS, overload_ratio=overload_ratio,
        namespace=metrics.METRICS_NAMESPACE, throttle_delay_secs=throttle_delay_secs)
    self._transport = transport
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
    return ServingClient(self._transport.connect(self._max_requests_in_flight),
                         self._max_requests_in_flight, f'planet-{self._transport.name}')

  def batch_elements_kwargs(self) -> dict[str, Any]:
    return dict(self._batching)

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    # Beam's default pickles the whole batch just to measure it.
    return sum(getattr(image, 'nbytes', 0) for image in batch)

  def validate_inference_args(self, inference_args: Optional[dict[str, Any]]) -> None:
    if inference_args:
      raise ValueError(f'{type(self).__name__} takes no inference_args, got '
                       f'{sorted(inference_args)}')

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
    address = self._transport.address
    payload = self._transport.encode(images, self._model)
    try:
      answer = self._call(client, payload, tally)
      version, outputs = self._transport.decode(answer)
      rows = _image_rows(version, outputs, len(images))
    except GaveUp as gave_up:
      return [(InputRefused(Reason.UNAVAILABLE, str(gave_up)), None)] * len(images), tally
    except CallFailed as failure:
      message = f'{address}: {failure.code.name}: {failure.details}'
      if len(images) == 1 or not may_be_one_image(failure.code):
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
      message = f'{address}: unusable answer: {error}'
      return [(InputRefused(Reason.INFERENCE_FAILED, message), None)] * len(images), tally
    answered_by = model_id(self._model.name, str(version))
    return [(row, answered_by) for row in rows], tally

  def _call(self, client: ServingClient, payload: Any, tally: CallTally) -> Any:
    """One request, retried on transient failures until the budget runs out (then `GaveUp`)."""
    return self._retry.call(
        lambda timeout: self._transport.send(client.connection, payload, self._model, timeout),
        request_bytes=self._transport.payload_bytes(payload), throttler=self.throttler,
        tally=tally, address=self._transport.address)

  def _count(self, tally: CallTally, answers) -> None:
    refused = [inference.reason for inference, _ in answers if isinstance(inference, InputRefused)]
    def named(what: str) -> str:
      return metrics.serving_metric(self._transport.name, what)
    metrics.counter(named(metrics.SERVING_REQUESTS)).inc(tally.requests)
    metrics.counter(named(metrics.SERVING_RETRIES)).inc(tally.retries)
    metrics.counter(named(metrics.SERVING_SINGLE_IMAGE_REQUESTS)).inc(tally.single_image_requests)
    metrics.counter(named(metrics.SERVING_PREDICTED_IMAGES)).inc(len(answers) - len(refused))
    metrics.counter(named(metrics.SERVING_UNAVAILABLE_IMAGES)).inc(
        refused.count(Reason.UNAVAILABLE))
    metrics.counter(named(metrics.SERVING_FAILED_IMAGES)).inc(
        refused.count(Reason.INFERENCE_FAILED))
    request_bytes = metrics.distribution(named(metrics.SERVING_REQUEST_BYTES))
    for size in tally.request_bytes:
      request_bytes.update(size)
    if tally.throttled_secs:
      metrics.counter(named(metrics.SERVING_THROTTLED_MS)).inc(int(tally.throttled_secs * 1000))
      self.throttler.throttling_signaler.signal_throttled(int(tally.throttled_secs))
