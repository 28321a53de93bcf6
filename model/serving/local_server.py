"""A TF Serving-compatible server (gRPC and REST), for development and tests without TF Serving.

It speaks TF Serving's gRPC API on the official `tensorflow_serving.apis` protos:
`tensorflow.serving.PredictionService` (`Predict`, `GetModelMetadata`) and
`tensorflow.serving.ModelService` (`GetModelStatus`), with TF Serving's version-folder rules (the
highest integer-named folder under the base path, polled every second: the default "latest"
policy), its status codes and messages, and its `model_spec` in every answer. A client cannot tell
it from the real server for the calls the project makes, so the gRPC prediction backend is tested
against it, with faults injected on purpose (latency, a share of UNAVAILABLE or RESOURCE_EXHAUSTED
answers, stop and restart on the same port). With `rest_api_port`, it also speaks TF Serving's REST
API (`model.serving.rest_api`) on a second port, answered by the same services, so the same models,
versions, signatures, messages and injected faults apply to both.

With `model_config_file` (TF Serving's `--model_config_file`, `model.serving.model_config`) the
model's name, base path, version policy and version labels come from that file, read again every
`model_config_file_poll_seconds` as `--model_config_file_poll_wait_seconds` makes TF Serving do;
requests may then name a version by label (`ModelSpec.version_label`, REST `/labels/NAME`).

Production runs TensorFlow Serving itself (`tensorflow_model_server`, or the `tensorflow/serving`
container image); see docs/serving.md. One deliberate difference: this server refuses requests
over the gRPC default of 4 MiB (`max_receive_message_bytes`), where `tensorflow_model_server`
raises its own limit to 2 GiB; proxies and servers started with `--grpc_channel_arguments` keep
lower limits, and a client that stays under 4 MiB works with all of them, so the tests hold
clients to it. The REST
port holds request bodies to the same limit (TF Serving sets none there).

Usage:
  with LocalServingServer('EXPORT/PlanetModel', port=0, rest_api_port=0) as server:
    stub = ...(grpc.insecure_channel(server.address))
    requests.post(f'http://{server.rest_address}/v1/models/PlanetModel:predict', json=...)
"""
import concurrent.futures
import logging
import threading
import time

import tensorflow as tf

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc

from model import schema
from model.serving.batching import BatchScheduler
from model.serving.batching import BatchingParameters
from model.serving.faults import FaultInjector
from model.serving.faults import Faults
from model.serving.model_config import ServedModelConfig
from model.serving.model_config import read_model_config
from model.serving.protocol import GRPC_DEFAULT_MAX_MESSAGE_BYTES
from model.serving.refusal import Refusal
from model.serving.repository import ModelRepository
from model.serving.rest_api import RestApi
from model.serving.rest_server import RestServer
from model.serving.services import ModelService
from model.serving.services import PredictionService
from model.serving.services import RequestStats

__all__ = ['DEFAULT_POLL_SECONDS', 'LocalServingServer']

_log = logging.getLogger('planet.serve')

# TF Serving's --file_system_poll_wait_seconds default.
DEFAULT_POLL_SECONDS = 1.0


class LocalServingServer:
  """The local server: a repository, a poller, gRPC and REST servers that can stop and start again.

  Usage:
    server = LocalServingServer('EXPORT/PlanetModel', port=0, faults=Faults(failure_fraction=0.3))
    port = server.start()          # the model is loaded before it listens, as TF Serving does
    server.stop(); server.start()  # the same port again; the loaded model is kept
    server.close()

  Args:
    model_base_path: the folder holding the numbered versions (EXPORT/PlanetModel).
    port: the port to listen on; 0 picks a free one (kept for restarts).
    rest_api_port: the REST API's port (0 picks a free one, kept for restarts); None: no REST API.
    model_name: the name clients ask for.
    host: the interface; the default serves this machine only.
    poll_seconds: how often to look for a new version.
    max_receive_message_bytes: the largest request accepted (gRPC's default 4 MiB), either API.
    ssl_key, ssl_cert: PEM bytes; with both, the server speaks TLS only (HTTPS on the REST port).
    faults: faults to inject (see `Faults`); `set_faults` changes them while running.
    max_workers: threads answering calls (with batching, requests wait for their batch on them:
      at most this many requests are merged at a time).
    batching: TF Serving's server-side batching (`--enable_batching`): concurrent Predict calls
      for the same signature are merged into one model call (`model.serving.batching`); None:
      each request is one model call.
    model_config_file: a ModelServerConfig in text format; its model replaces model_base_path
      and model_name (give None for those), with its version policy and labels.
    model_config_file_poll_seconds: how often the file is read again (0: only at start).
  """

  def __init__(self, model_base_path: str | None, port: int = 0, *,
               rest_api_port: int | None = None, model_name: str = schema.MODEL_NAME,
               host: str = '127.0.0.1', poll_seconds: float = DEFAULT_POLL_SECONDS,
               max_receive_message_bytes: int = GRPC_DEFAULT_MAX_MESSAGE_BYTES,
               ssl_key: bytes | None = None, ssl_cert: bytes | None = None,
               faults: Faults | None = None, max_workers: int = 8,
               batching: BatchingParameters | None = None,
               model_config_file: str | None = None,
               model_config_file_poll_seconds: float = 0.0):
    if (ssl_key is None) != (ssl_cert is None):
      raise ValueError('TLS needs both ssl_key and ssl_cert')
    self._config_file = model_config_file
    self._config_poll_seconds = model_config_file_poll_seconds
    self._config_text: str | None = None
    self._config: ServedModelConfig | None = None
    if model_config_file is not None:
      self._config_text, self._config = self._read_config()
      model_base_path, model_name = self._config.base_path, self._config.name
    self.repository = ModelRepository(
        model_base_path, model_name,
        **({'version_policy': self._config.version_policy} if self._config else {}))
    self.host = host
    self.port = port
    self._poll_seconds = poll_seconds
    self._max_receive = max_receive_message_bytes
    self._ssl = (ssl_key, ssl_cert) if ssl_key is not None else None
    self._faults = FaultInjector(faults or Faults())
    self._stats = RequestStats()
    self._max_workers = max_workers
    self._batching = batching
    self._scheduler: BatchScheduler | None = None
    self._server: grpc.Server | None = None
    self._rest = None if rest_api_port is None else RestServer(
        host, rest_api_port, max_body_bytes=max_receive_message_bytes, ssl_key=ssl_key,
        ssl_cert=ssl_cert, threads=max_workers)
    self._rest_body_bytes: list[int] = []
    self._stop_polling = threading.Event()
    self._poller: threading.Thread | None = None

  @property
  def address(self) -> str:
    return f'{self.host}:{self.port}'

  @property
  def rest_api_port(self) -> int | None:
    return self._rest.port if self._rest else None

  @property
  def rest_address(self) -> str | None:
    """host:port of the REST API (None without one)."""
    return f'{self.host}:{self._rest.port}' if self._rest else None

  @property
  def rest_predict_body_bytes(self) -> list[int]:
    """The size of every REST `:predict` body received so far."""
    return list(self._rest_body_bytes)

  @property
  def predict_request_bytes(self) -> list[int]:
    """The serialized size of every Predict request received so far (a REST call's counts too)."""
    return list(self._stats.predict_request_bytes)

  @property
  def model_call_rows(self) -> list[int]:
    """The rows (images) of every model call so far: one per request without batching."""
    return list(self._stats.model_call_rows)

  @property
  def model_call_requests(self) -> list[int]:
    """How many requests every model call so far answered (above 1: merged by batching)."""
    return list(self._stats.model_call_requests)

  @property
  def peak_predicts_in_progress(self) -> int:
    """The most Predict calls (gRPC and REST) this server had in progress at once."""
    return self._stats.peak_predicts_in_progress

  @property
  def served_version(self) -> int | None:
    current = self.repository.current
    return current.version if current else None

  def set_faults(self, faults: Faults) -> None:
    self._faults.set(faults)

  def _read_config(self) -> tuple[str, ServedModelConfig]:
    with tf.io.gfile.GFile(self._config_file) as f:
      text = f.read()
    return text, read_model_config(text, self._config_file)

  def reload_config(self) -> bool:
    """Reads `model_config_file` again; a changed version policy or labels apply at once.
    Returns whether it changed.

    Raises:
      ValueError: the file is unreadable or wrong, names another model or base path, or a label
        names a version that is not AVAILABLE (then the config in force stays).
    """
    try:
      text, config = self._read_config()
    except (OSError, tf.errors.OpError) as error:
      raise ValueError(f'cannot read {self._config_file}: {error}') from None
    if text == self._config_text:
      return False
    if (config.name, config.base_path) != (self.repository.model_name,
                                           self.repository.base_path):
      raise ValueError(f'{self._config_file} now names model {config.name} at '
                       f'{config.base_path}; the local server keeps the model it started with '
                       '(restart it to serve another)')
    self.repository.set_version_policy(config.version_policy)
    self.repository.poll()
    self._apply_labels(config)
    self._config_text, self._config = text, config
    _log.info('serve: read %s: labels %s', self._config_file, config.version_labels or 'none')
    return True

  def _apply_labels(self, config: ServedModelConfig) -> None:
    try:
      self.repository.set_labels(config.version_labels)
    except Refusal as refusal:
      raise ValueError(f'{self._config_file}: {refusal.message}') from None

  def start(self) -> int:
    """Loads the newest complete version (when there is one), listens, and returns the port.

    Raises:
      ValueError: a label of `model_config_file` names a version that did not load.
    """
    if self._server is not None:
      raise RuntimeError(f'already serving on {self.address}')
    self.repository.poll()
    if self._config is not None:
      self._apply_labels(self._config)
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=self._max_workers,
                                              thread_name_prefix='serve'),
        options=[('grpc.max_receive_message_length', self._max_receive),
                 ('grpc.max_send_message_length', -1),
                 # Two servers must never share a port by accident (a restart must find it free).
                 ('grpc.so_reuseport', 0)])
    if self._batching is not None:
      self._scheduler = BatchScheduler(self._batching, self._stats.record_model_call)
    # One set of services answers both APIs: the same checks, messages, faults and batching.
    predictions = PredictionService(self.repository, self._faults, self._stats, self._scheduler)
    models = ModelService(self.repository)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(predictions, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(models, server)
    target = f'{self.host}:{self.port}'
    try:
      if self._ssl:
        credentials = grpc.ssl_server_credentials([self._ssl])
        bound = server.add_secure_port(target, credentials)
      else:
        bound = server.add_insecure_port(target)
    except RuntimeError as error:
      self._close_scheduler()
      raise OSError(f'cannot listen on {target}: {error}') from error
    if not bound:
      self._close_scheduler()
      raise OSError(f'cannot listen on {target}')
    self.port = bound
    server.start()
    if self._rest is not None:
      try:
        self._rest.start(RestApi(self.repository, predictions, models, self._rest_body_bytes))
      except OSError:
        server.stop(None).wait()
        self._close_scheduler()
        raise
    self._server = server
    self._stop_polling.clear()
    self._poller = threading.Thread(target=self._poll_loop, name='serve-poller', daemon=True)
    self._poller.start()
    _log.info('serve: listening on %s (%s%s)', self.address, 'TLS' if self._ssl else 'plaintext',
              f', batching {self._batching}' if self._batching else '')
    if self._rest is not None:
      _log.info('serve: REST API on %s://%s', 'https' if self._ssl else 'http', self.rest_address)
    return self.port

  def _poll_loop(self) -> None:
    config_due = time.monotonic() + self._config_poll_seconds
    rejected = None
    wait = (min(self._poll_seconds, self._config_poll_seconds) if self._config_poll_seconds
            else self._poll_seconds)
    while not self._stop_polling.wait(wait):
      try:
        self.repository.poll()
      except Exception as error:  # pylint: disable=broad-except
        # A file system hiccup must not stop the server from following new versions.
        _log.warning('serve: polling %s failed: %s', self.repository.base_path, error)
      if self._config_poll_seconds and time.monotonic() >= config_due:
        config_due = time.monotonic() + self._config_poll_seconds
        try:
          self.reload_config()
          rejected = None
        except ValueError as error:
          # As TF Serving does: the config in force stays, the reason is logged (once).
          if str(error) != rejected:
            _log.warning('serve: %s', error)
          rejected = str(error)

  def stop(self, grace: float | None = None) -> None:
    """Stops listening (in-flight calls end after `grace` seconds, at once by default)."""
    self._stop_polling.set()
    if self._poller is not None:
      self._poller.join()
      self._poller = None
    if self._rest is not None:
      self._rest.stop()
    if self._server is not None:
      self._server.stop(grace).wait()
      self._server = None
    self._close_scheduler()

  def _close_scheduler(self) -> None:
    if self._scheduler is not None:
      self._scheduler.close()
      self._scheduler = None

  close = stop

  def wait(self) -> None:
    """Blocks until the server stops."""
    if self._server is not None:
      self._server.wait_for_termination()

  def __enter__(self) -> 'LocalServingServer':
    self.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self.stop()
