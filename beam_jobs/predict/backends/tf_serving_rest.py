"""The REST backend of the prediction job: TF Serving's JSON API, with the gRPC backend's rules.

`ServingRestHandler` is the gRPC handler (`tf_serving.ServingGrpcHandler`) with another wire: each
`PredictRequest` it plans is posted as the JSON body that TF Serving's REST layer turns back into
that request (`{"signature_name": ..., "inputs": {"images": [...]}}`, the columnar format), and
the `outputs` of the answer become the `PredictResponse` the gRPC handler reads. So everything else
is the gRPC handler's: deadlines, retries with backoff within the budget (`retry_policy`), Beam's
client-side throttling, refused requests re-sent image by image, dead letters, result rows.

An HTTP answer is read as the gRPC code TF Serving meant by it (`rest_protocol`): 503 (and a
proxy's 502) UNAVAILABLE, 429 RESOURCE_EXHAUSTED, 504 DEADLINE_EXCEEDED, which the retry policy
retries, as it does a refused or reset connection (UNAVAILABLE) and a missed deadline; 400, 404,
413 and 500 are not retried. Requests are sized by their JSON body: a uint8 value takes at most 4
bytes and a pixel's brackets 2 more, so at most 5 body bytes per image byte (a 128 px chip: 246 KB
at most, about 3.6x its 49 KB of pixels in practice), under `max_request_bytes`.

REST's answer does not say which version answered, so each call names one in its URL: the
`model_version` given; with `model_version_label`, the version the label names in the server's
status (`GET /v1/models/NAME/labels/LABEL`), asked again at most every second so that a label
moved mid-job is followed; or else the latest AVAILABLE one in the server's status
(`GET /v1/models/NAME`), asked once per worker. Either is asked again when the server answers
404 for it (a newer version replaced it). Every row names the version that answered.

Usage:
  image_size, version = check_serving_model('localhost:8501')         # before the pipeline
  handler = KeyedModelHandler(ServingRestHandler('localhost:8501', image_size=image_size))
"""
import concurrent.futures
import json
import os
import tempfile
import threading
import time
from typing import Any

import grpc
import requests
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import predict_pb2

from beam_jobs.predict.backends.retry_policy import CallTally
from beam_jobs.predict.backends.retry_policy import RetryPolicy
from beam_jobs.predict.backends.serving_address import HTTP2
from beam_jobs.predict.backends.serving_address import answering_protocol
from beam_jobs.predict.backends.serving_address import check_serving_address
from beam_jobs.predict.backends.serving_address import rest_port_message
from beam_jobs.predict.backends.tf_serving import DEFAULT_MAX_REQUEST_BYTES
from beam_jobs.predict.backends.tf_serving import ServingGrpcHandler
from beam_jobs.predict.backends.tf_serving import served_image_size
from beam_jobs.predict.backends.tf_serving import wanted_model
from model import schema
from model.serving.protocol import is_loopback_host
from model.serving.protocol import parse_address
from model.serving.protocol import tensor_as_proto_field
from model.serving.protocol import tensor_from_proto
from model.serving.rest_protocol import base_url
from model.serving.rest_protocol import code_of_http_status
from model.serving.rest_protocol import predict_path
from model.serving.rest_protocol import status_path
from model.serving.rest_tensors import columnar_request
from model.serving.rest_tensors import read_float_outputs

__all__ = ['JSON_BYTES_PER_IMAGE_BYTE', 'RestCallFailed', 'RestClient', 'ServingRestHandler',
           'check_rest_transport', 'check_serving_model', 'image_bytes_within']

# The most JSON body bytes a uint8 image byte takes ("255," plus its pixel's "[", "]," shared by 3).
JSON_BYTES_PER_IMAGE_BYTE = 5
# signature_name, the "inputs" object and the outer brackets.
_BODY_OVERHEAD_BYTES = 256
# How long the version a label named is used before the label is asked again: TF Serving reads
# a moved label from its config file at most this often (--model_config_file_poll_wait_seconds).
_LABEL_REFRESH_SECS = 1.0


def image_bytes_within(max_request_bytes: int) -> int:
  """The image bytes a request may hold so that its JSON body stays within `max_request_bytes`."""
  return (max_request_bytes - _BODY_OVERHEAD_BYTES) // JSON_BYTES_PER_IMAGE_BYTE


def check_rest_transport(address: str, *, use_tls: bool = False,
                         allow_insecure: bool = False) -> None:
  """Refuses an address with a scheme, and plain HTTP to a host beyond this machine
  (`protocol.check_transport`'s rule)."""
  check_serving_address(address)
  host, _ = parse_address(address)
  if use_tls and allow_insecure:
    raise ValueError('use_tls (--tls) and allow_insecure (--allow_insecure) contradict each other; '
                     'pick one')
  if not use_tls and not allow_insecure and not is_loopback_host(host):
    raise ValueError(
        f'refusing plain HTTP to {host}: it is not a loopback address, and the images would cross '
        'the network unencrypted. Use HTTPS (use_tls=True; --tls, with --root_cert FILE for a '
        'private CA) or, on a network you trust, allow it explicitly (allow_insecure=True; '
        '--allow_insecure).')


class RestCallFailed(grpc.RpcError):
  """An HTTP call without a 200 answer, as the gRPC status TF Serving meant (the retry policy's
  terms: `code()`, `details()`); `http_status` is None when no answer came."""

  def __init__(self, code: grpc.StatusCode, details: str, http_status: int | None = None):
    super().__init__(details)
    self._code = code
    self._details = details
    self.http_status = http_status

  def code(self) -> grpc.StatusCode:
    return self._code

  def details(self) -> str:
    return self._details


class _Body:
  """A predict body, sized as the retry policy sizes requests (`ByteSize()`)."""

  def __init__(self, data: bytes):
    self.data = data

  def ByteSize(self) -> int:  # pylint: disable=invalid-name
    return len(self.data)


class RestClient:
  """What `create_client` makes on a worker: a connection pool, threads, the version being asked.

  Args:
    url: http(s)://host:port of the server.
    root_certificates: PEM bytes to trust for HTTPS (default: the system's).
    max_requests_in_flight: connections and threads.
  """

  def __init__(self, url: str, root_certificates: bytes | None, max_requests_in_flight: int):
    self.address = url
    self.session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max_requests_in_flight,
                                            max_retries=0)
    self.session.mount('http://', adapter)
    self.session.mount('https://', adapter)
    self._ca_file = None
    if root_certificates:
      # requests reads trusted certificates from a file only.
      handle, self._ca_file = tempfile.mkstemp(prefix='planet-ca-', suffix='.pem')
      with os.fdopen(handle, 'wb') as f:
        f.write(root_certificates)
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_requests_in_flight,
                                                      thread_name_prefix='planet-rest')
    self.version: int | None = None
    self.version_asked_at = 0.0   # time.monotonic() when `version` was asked for (labels)
    self.version_lock = threading.Lock()

  def call(self, method: str, path: str, timeout_secs: float, body: bytes | None = None) -> bytes:
    """The answer's body; `RestCallFailed` for any other answer than 200, or none."""
    try:
      # verify per call: a session's own is overridden by REQUESTS_CA_BUNDLE when set.
      response = self.session.request(method, self.address + path, data=body,
                                      timeout=timeout_secs, verify=self._ca_file or True,
                                      headers={'Content-Type': 'application/json'})
    except requests.Timeout as error:
      raise RestCallFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f'no answer within {timeout_secs:g}s ({error})') from None
    except requests.ConnectionError as error:   # refused, reset, closed mid-answer, TLS
      raise RestCallFailed(grpc.StatusCode.UNAVAILABLE, f'connection failed: {error}') from None
    if response.status_code != 200:
      try:
        message = response.json()['error']
      except (ValueError, KeyError, TypeError):
        message = response.text[:300]
      raise RestCallFailed(code_of_http_status(response.status_code),
                           f'HTTP {response.status_code}: {message}', response.status_code)
    return response.content

  def versions(self, model_name: str, timeout_secs: float,
               label: str | None = None) -> dict[int, str]:
    """{version: state} from the server's GetModelStatus (`GET /v1/models/NAME[/labels/L]`)."""
    answer = json.loads(
        self.call('GET', status_path(model_name, label=label), timeout_secs))
    return {int(s['version']): s['state'] for s in answer.get('model_version_status', [])}

  def close(self) -> None:
    self.pool.shutdown(wait=False)
    self.session.close()
    if self._ca_file:
      os.unlink(self._ca_file)
      self._ca_file = None


def _served_versions(client: RestClient, model_name: str, timeout_secs: float) -> str:
  """'versions 3 (AVAILABLE), 2 (END)', or why they could not be listed."""
  try:
    states = client.versions(model_name, timeout_secs)
  except (RestCallFailed, ValueError) as error:
    return f'no versions ({error})'
  return 'versions ' + ', '.join(f'{v} ({states[v]})' for v in sorted(states, reverse=True))


def check_serving_model(address: str, model_name: str = schema.MODEL_NAME,
                        model_version: int | None = None,
                        signature: str = schema.SERVING_SIGNATURE, *,
                        image_size: int | None = None, use_tls: bool = False,
                        root_certificates: bytes | None = None, allow_insecure: bool = False,
                        timeout_secs: float = 10.0,
                        model_version_label: str | None = None) -> tuple[int, int]:
  """`tf_serving.check_serving_model` over REST (`GET .../metadata`): returns (image_size, version).

  Waits up to `timeout_secs` for a server that is still starting. A connection that fails without
  an HTTP answer is probed (`serving_address`): a gRPC server there is named at once.

  Raises:
    ValueError: naming what was expected and what was found.
  """
  check_rest_transport(address, use_tls=use_tls, allow_insecure=allow_insecure)
  wanted = wanted_model(model_name, model_version, model_version_label)
  client = RestClient(base_url(address, use_tls), root_certificates, 1)
  url = client.address
  give_up_at = time.monotonic() + timeout_secs
  try:
    while True:
      try:
        answer = client.call('GET', status_path(model_name, model_version, metadata=True,
                                                label=model_version_label), timeout_secs)
        break
      except RestCallFailed as failure:
        if failure.http_status == 404:
          versions = _served_versions(client, model_name, timeout_secs)
          raise ValueError(f'{url} does not serve {wanted} ({failure.details()}); for model '
                           f'{model_name!r} it has {versions}') from None
        if failure.http_status is not None:
          raise ValueError(f'{url} refused the metadata request for {wanted}: '
                           f'{failure.details()}') from None
        # A refused connection (a server still starting) is refused again at once; only a
        # server that answered in another protocol makes the probe read anything.
        if (failure.code() == grpc.StatusCode.UNAVAILABLE
            and answering_protocol(address, use_tls=use_tls,
                                   root_certificates=root_certificates) == HTTP2):
          raise ValueError(rest_port_message(url)) from None
        if time.monotonic() >= give_up_at:
          raise ValueError(
              f'no TF Serving REST API answered at {url} within {timeout_secs:g}s '
              f'({failure.details()}); start one (README: "Serving with TensorFlow Serving"), fix '
              'the address, or check --tls and --root_cert') from None
        time.sleep(0.2)
  finally:
    client.close()
  try:
    metadata = json.loads(answer)
    found_name = metadata['model_spec']['name']
    found_version = int(metadata['model_spec']['version'])
    signature_map = json_format.ParseDict(metadata['metadata']['signature_def'],
                                          get_model_metadata_pb2.SignatureDefMap(),
                                          ignore_unknown_fields=True)
  except (ValueError, KeyError, TypeError, json_format.ParseError) as error:
    raise ValueError(f'{url} sent no usable metadata for {wanted} ({error})') from None
  if found_name != model_name:
    raise ValueError(f'{url} answered for model {found_name!r}; expected {model_name!r}')
  if model_version is not None and found_version != model_version:
    raise ValueError(f'{url} answered with version {found_version}; expected {model_version}')
  where = f'{model_name} version {found_version} at {url}'
  return served_image_size(signature_map, signature, where, image_size), found_version


class ServingRestHandler(ServingGrpcHandler):
  """Predicts uint8 [H, W, 3] images with a model served by TensorFlow Serving's REST API.

  Takes `ServingGrpcHandler`'s arguments (less `tls_server_name`), with `max_request_bytes`
  counting JSON body bytes (default 4 MiB less 64 KiB, as for gRPC: the local server's limit).
  """
  COUNTER_PREFIX = 'rest_'

  def __init__(self, address: str, *, model_name: str = schema.MODEL_NAME,
               model_version: int | None = None, signature: str = schema.SERVING_SIGNATURE,
               use_tls: bool = False, root_certificates: bytes | None = None,
               allow_insecure: bool = False, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_requests_in_flight: int = 4, timeout_secs: float = 30.0,
               retry_budget_secs: float = 30.0, initial_backoff_secs: float = 0.25,
               max_backoff_secs: float = 4.0, model_version_label: str | None = None,
               **batching_and_throttling: Any):
    check_rest_transport(address, use_tls=use_tls, allow_insecure=allow_insecure)
    super().__init__(
        address, model_name=model_name, model_version=model_version, signature=signature,
        model_version_label=model_version_label,
        use_tls=use_tls, root_certificates=root_certificates, allow_insecure=allow_insecure,
        max_request_bytes=image_bytes_within(max_request_bytes),
        max_requests_in_flight=max_requests_in_flight, timeout_secs=timeout_secs,
        retry_budget_secs=retry_budget_secs, initial_backoff_secs=initial_backoff_secs,
        max_backoff_secs=max_backoff_secs, **batching_and_throttling)
    self._url = base_url(address, use_tls)
    self._rest_model = (model_name, model_version, signature)
    self._rest_label = model_version_label
    self._rest_certificates = root_certificates
    self._rest_in_flight = max_requests_in_flight
    self._rest_retry = RetryPolicy(timeout_secs, retry_budget_secs, initial_backoff_secs,
                                   max_backoff_secs)

  def create_client(self) -> RestClient:
    return RestClient(self._url, self._rest_certificates, self._rest_in_flight)

  def _call(self, client: RestClient, request: predict_pb2.PredictRequest,
            tally: CallTally) -> predict_pb2.PredictResponse:
    """One Predict as a REST call, retried as the gRPC one is; the answer as a PredictResponse."""
    model_name, _, signature = self._rest_model
    body = _Body(columnar_request(
        {alias: tensor_from_proto(tensor) for alias, tensor in request.inputs.items()}, signature))
    version, outputs = self._rest_retry.call(
        lambda sent, timeout: self._post(client, sent, timeout), body, throttler=self.throttler,
        tally=tally, address=client.address)
    response = predict_pb2.PredictResponse()
    response.model_spec.name = model_name
    response.model_spec.version.value = version
    response.model_spec.signature_name = signature
    for name, array in outputs.items():
      response.outputs[name].CopyFrom(tensor_as_proto_field(array))
    return response

  def _post(self, client: RestClient, body: _Body, timeout: float):
    """(version, outputs) from one predict call to the version asked for (see the module)."""
    model_name, fixed_version, _ = self._rest_model
    version = fixed_version if fixed_version is not None else self._known_version(client, timeout)
    try:
      answer = client.call('POST', predict_path(model_name, version), timeout, body.data)
    except RestCallFailed as failure:
      if failure.code() != grpc.StatusCode.NOT_FOUND or fixed_version is not None:
        raise
      latest = self._ask_version(client, timeout)
      if latest == version:
        raise
      version = latest
      answer = client.call('POST', predict_path(model_name, version), timeout, body.data)
    return version, read_float_outputs(answer, schema.OUTPUT_NAMES)

  def _known_version(self, client: RestClient, timeout: float) -> int:
    """The version last asked for; a label's is asked again once it is a second old."""
    with client.version_lock:
      version, asked_at = client.version, client.version_asked_at
    stale = self._rest_label is not None and time.monotonic() - asked_at > _LABEL_REFRESH_SECS
    return self._ask_version(client, timeout) if version is None or stale else version

  def _ask_version(self, client: RestClient, timeout: float) -> int:
    """The version the label names, or else the highest AVAILABLE one, remembered for the next
    calls; UNAVAILABLE while there is none."""
    model_name = self._rest_model[0]
    states = client.versions(model_name, timeout, label=self._rest_label)
    available = [v for v, state in states.items() if state == 'AVAILABLE']
    if not available:
      raise RestCallFailed(grpc.StatusCode.UNAVAILABLE,
                           f'no version of {model_name} is AVAILABLE yet: {states}')
    with client.version_lock:
      client.version, client.version_asked_at = max(available), time.monotonic()
      return client.version
