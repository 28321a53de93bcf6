"""The REST backend of the prediction job: TensorFlow Serving's JSON API, as a transport.

`RestTransport` is the wire under `serving_base.ServingHandler` for TF Serving's REST API
(`--rest_api_port`, 8501): a batch of images is posted as one JSON body in the columnar format
(`{"signature_name": ..., "inputs": {"images": [...]}}`, written from the numpy arrays), and the
`outputs` of the answer are read straight into float32 arrays (`model.serving.rest_tensors`).
Batching, deadlines, retries with backoff within the budget (`retry_policy`), client-side
throttling, refused requests re-sent image by image, dead letters and rows are `serving_base`'s.

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
import json
import os
import tempfile
import threading
import time
from typing import Any

import grpc
import numpy as np
import requests
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2

from beam_jobs.predict.backends.retry_policy import CallFailed
from beam_jobs.predict.backends.serving_address import HTTP2
from beam_jobs.predict.backends.serving_address import answering_protocol
from beam_jobs.predict.backends.serving_address import check_serving_address
from beam_jobs.predict.backends.serving_address import rest_port_message
from beam_jobs.predict.backends.serving_base import ServingHandler
from beam_jobs.predict.backends.serving_check import check_served_model
from beam_jobs.predict.backends.transport import ServedModel, Transport
from model import schema
from model.serving.protocol import is_loopback_host
from model.serving.protocol import parse_address
from model.serving.rest_protocol import base_url
from model.serving.rest_protocol import code_of_http_status
from model.serving.rest_protocol import predict_path
from model.serving.rest_protocol import status_path
from model.serving.rest_tensors import columnar_request
from model.serving.rest_tensors import read_float_outputs

__all__ = ['JSON_BYTES_PER_IMAGE_BYTE', 'RestConnection', 'RestTransport', 'ServingRestHandler',
           'check_rest_transport', 'check_serving_model', 'image_bytes_within']

# The most JSON body bytes a uint8 image byte takes ("255," plus its pixel's "[", "]," shared by 3).
JSON_BYTES_PER_IMAGE_BYTE = 5
# signature_name, the "inputs" object and the outer brackets.
_BODY_OVERHEAD_BYTES = 256
# How long the version a label named is used before the label is asked again: TF Serving reads
# a moved label from its config file at most this often (--model_config_file_poll_wait_seconds).
_LABEL_REFRESH_SECS = 1.0
# How often the start-up check asks again while nothing listens yet (a server still starting).
_STARTING_POLL_SECS = 0.2


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


class RestConnection:
  """A worker's connection pool to the server, and the version its calls name.

  Args:
    url: http(s)://host:port of the server.
    root_certificates: PEM bytes to trust for HTTPS (default: the system's).
    max_requests_in_flight: connections kept open.
  """

  def __init__(self, url: str, root_certificates: bytes | None, max_requests_in_flight: int):
    self.url = url
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
    self.version: int | None = None
    self.version_asked_at = 0.0   # time.monotonic() when `version` was asked for (labels)
    self.version_lock = threading.Lock()

  def call(self, method: str, path: str, timeout_secs: float, body: bytes | None = None) -> bytes:
    """The answer's body; `CallFailed` for any other answer than 200, or none."""
    try:
      # verify per call: a session's own is overridden by REQUESTS_CA_BUNDLE when set.
      response = self.session.request(method, self.url + path, data=body,
                                      timeout=timeout_secs, verify=self._ca_file or True,
                                      headers={'Content-Type': 'application/json'})
    except requests.Timeout as error:
      raise CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                       f'no answer within {timeout_secs:g}s ({error})', answered=False) from None
    except requests.ConnectionError as error:   # refused, reset, closed mid-answer, TLS
      raise CallFailed(grpc.StatusCode.UNAVAILABLE, f'connection failed: {error}',
                       answered=False) from None
    if response.status_code != 200:
      try:
        message = response.json()['error']
      except (ValueError, KeyError, TypeError):
        message = response.text[:300]
      raise CallFailed(code_of_http_status(response.status_code),
                       f'HTTP {response.status_code}: {message}')
    return response.content

  def versions(self, model_name: str, timeout_secs: float,
               label: str | None = None) -> dict[int, str]:
    """{version: state} from GetModelStatus (`GET /v1/models/NAME[/labels/L]`)."""
    answer = json.loads(self.call('GET', status_path(model_name, label=label), timeout_secs))
    return {int(s['version']): s['state'] for s in answer.get('model_version_status', [])}

  def close(self) -> None:
    self.session.close()
    if self._ca_file:
      os.unlink(self._ca_file)
      self._ca_file = None


class RestTransport(Transport):
  """TF Serving's REST API at `address` (HOST:PORT): http://, or https:// with `use_tls`.

  Args:
    root_certificates: PEM bytes to trust for HTTPS (default: the system's).
  """
  name = 'rest'

  def __init__(self, address: str, *, use_tls: bool = False,
               root_certificates: bytes | None = None):
    self.address = base_url(address, use_tls)
    self._host_port = address
    self._use_tls = use_tls
    self._root_certificates = root_certificates

  def image_bytes_within(self, max_request_bytes: int) -> int:
    return image_bytes_within(max_request_bytes)

  def connect(self, max_requests_in_flight: int) -> RestConnection:
    return RestConnection(self.address, self._root_certificates, max_requests_in_flight)

  def encode(self, images: list[np.ndarray], model: ServedModel) -> bytes:
    return columnar_request({schema.INPUT_IMAGES: np.stack(images)}, model.signature)

  def payload_bytes(self, payload: bytes) -> int:
    return len(payload)

  def send(self, connection: RestConnection, payload: bytes, model: ServedModel,
           timeout_secs: float) -> tuple[int, bytes]:
    """(version, answer body) from one predict call to the version asked for (see the module)."""
    version = model.version
    if version is None:
      version = self._known_version(connection, model, timeout_secs)
    try:
      answer = connection.call('POST', predict_path(model.name, version), timeout_secs, payload)
    except CallFailed as failure:
      if failure.code != grpc.StatusCode.NOT_FOUND or model.version is not None:
        raise
      latest = self._ask_version(connection, model, timeout_secs)
      if latest == version:
        raise
      version = latest
      answer = connection.call('POST', predict_path(model.name, version), timeout_secs, payload)
    return version, answer

  def decode(self, answer: tuple[int, bytes]) -> tuple[int, dict[str, np.ndarray]]:
    version, body = answer
    return version, read_float_outputs(body, schema.OUTPUT_NAMES)

  def _known_version(self, connection: RestConnection, model: ServedModel, timeout: float) -> int:
    """The version last asked for; a label's is asked again once it is a second old."""
    with connection.version_lock:
      version, asked_at = connection.version, connection.version_asked_at
    stale = model.label is not None and time.monotonic() - asked_at > _LABEL_REFRESH_SECS
    return self._ask_version(connection, model, timeout) if version is None or stale else version

  def _ask_version(self, connection: RestConnection, model: ServedModel, timeout: float) -> int:
    """The version the label names, or else the highest AVAILABLE one, remembered for the next
    calls; UNAVAILABLE while there is none."""
    states = connection.versions(model.name, timeout, label=model.label)
    available = [v for v, state in states.items() if state == 'AVAILABLE']
    if not available:
      raise CallFailed(grpc.StatusCode.UNAVAILABLE,
                       f'no version of {model.name} is AVAILABLE yet: {states}')
    with connection.version_lock:
      connection.version, connection.version_asked_at = max(available), time.monotonic()
      return connection.version

  def metadata(self, connection: RestConnection, model: ServedModel, timeout_secs: float
               ) -> tuple[str, int, get_model_metadata_pb2.SignatureDefMap | None]:
    """`GET .../metadata`, asked again while nothing listens yet; a gRPC server there (one
    short probe, `serving_address`) is named at once."""
    path = status_path(model.name, model.version, metadata=True, label=model.label)
    give_up_at = time.monotonic() + timeout_secs
    while True:
      try:
        answer = connection.call('GET', path, timeout_secs)
        break
      except CallFailed as failure:
        if failure.answered:
          raise
        # A refused connection (a server still starting) is refused again at once; only a
        # server that answered in another protocol makes the probe read anything.
        if (failure.code == grpc.StatusCode.UNAVAILABLE
            and answering_protocol(self._host_port, use_tls=self._use_tls,
                                   root_certificates=self._root_certificates) == HTTP2):
          raise ValueError(rest_port_message(self.address)) from None
        if time.monotonic() >= give_up_at:
          raise
        time.sleep(_STARTING_POLL_SECS)
    try:
      metadata = json.loads(answer)
      return (metadata['model_spec']['name'], int(metadata['model_spec']['version']),
              json_format.ParseDict(metadata['metadata']['signature_def'],
                                    get_model_metadata_pb2.SignatureDefMap(),
                                    ignore_unknown_fields=True))
    except (ValueError, KeyError, TypeError, json_format.ParseError) as error:
      raise ValueError(f'{self.address} sent no usable metadata for {model} ({error})') from None

  def versions(self, connection: RestConnection, model_name: str,
               timeout_secs: float) -> dict[int, str]:
    states = connection.versions(model_name, timeout_secs)
    return {version: states[version] for version in sorted(states, reverse=True)}

  def failure_text(self, failure: CallFailed) -> str:
    return failure.details   # it starts with the HTTP status, or says that none came

  def unanswered_message(self, failure: CallFailed, timeout_secs: float) -> str:
    return (f'no TF Serving REST API answered at {self.address} within {timeout_secs:g}s '
            f'({failure.details}); start one (docs/serving.md), fix the address, or check --tls '
            'and --root_cert')


def check_serving_model(address: str, *model: Any, use_tls: bool = False,
                        root_certificates: bytes | None = None, allow_insecure: bool = False,
                        **model_and_timeout: Any) -> tuple[int, int]:
  """`serving_check.check_served_model` over REST (`GET .../metadata`): returns (image_size,
  version). Waits up to `timeout_secs` (10 s) for a server that is still starting.

  Raises:
    ValueError: naming what was expected and what was found.
  """
  check_rest_transport(address, use_tls=use_tls, allow_insecure=allow_insecure)
  return check_served_model(RestTransport(address, use_tls=use_tls,
                                          root_certificates=root_certificates),
                            *model, **model_and_timeout)


class ServingRestHandler(ServingHandler):
  """Predicts uint8 [H, W, 3] images with a model served by TensorFlow Serving's REST API.

  Takes `ServingGrpcHandler`'s arguments (less `tls_server_name`), with `max_request_bytes`
  counting JSON body bytes (default 4 MiB less 64 KiB, as for gRPC: the local server's limit).
  """

  def __init__(self, address: str, *, use_tls: bool = False,
               root_certificates: bytes | None = None, allow_insecure: bool = False,
               **model_and_limits: Any):
    check_rest_transport(address, use_tls=use_tls, allow_insecure=allow_insecure)
    super().__init__(RestTransport(address, use_tls=use_tls, root_certificates=root_certificates),
                     **model_and_limits)
