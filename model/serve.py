"""A TensorFlow Serving-compatible gRPC server, for development and tests without TF Serving installed.

It speaks TF Serving's gRPC API on the official `tensorflow_serving.apis` protos:
`tensorflow.serving.PredictionService` (`Predict`, `GetModelMetadata`) and
`tensorflow.serving.ModelService` (`GetModelStatus`), with TF Serving's version-folder rules (the
highest integer-named folder under the base path, polled every second: the default "latest"
policy), its status codes and messages, and its `model_spec` in every answer. A client cannot tell
it from the real server for the calls the project makes, so the gRPC prediction backend is tested
against it, with faults injected on purpose (latency, a share of UNAVAILABLE or RESOURCE_EXHAUSTED
answers, stop and restart on the same port).

Production runs TensorFlow Serving itself (`tensorflow_model_server`, or the `tensorflow/serving`
container image); see the README. One deliberate difference: this server refuses requests over the
gRPC default of 4 MiB (`max_receive_message_bytes`), where `tensorflow_model_server` raises its own
limit to 2 GiB; proxies and servers started with `--grpc_channel_arguments` keep lower limits, and
a client that stays under 4 MiB works with all of them, so the tests hold clients to it.

Usage:
  python -m model.serve --model_base_path EXPORT/PlanetModel --port 8500 [--model_name PlanetModel]

In Python (tests):
  with LocalServingServer('EXPORT/PlanetModel', port=0) as server:
    stub = ...(grpc.insecure_channel(server.address))
"""
import argparse
import concurrent.futures
import dataclasses
import logging
import os
import random
import socket
import subprocess
import tempfile
import threading
import time
from typing import Callable

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from model import schema
from model.export import list_versions
from model.saved_model_info import incomplete_reason, read_signature_defs

_log = logging.getLogger('planet.serve')

# gRPC's own default; see the module docstring for why this server keeps it.
GRPC_DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# TF Serving's --file_system_poll_wait_seconds default.
DEFAULT_POLL_SECONDS = 1.0
_PREDICT_METHOD = 'tensorflow/serving/predict'
_METADATA_FIELD = 'signature_def'
_State = get_model_status_pb2.ModelVersionStatus.State
_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class _Refusal(Exception):
  """An RPC answer other than OK: a gRPC status code and TF Serving's message for it."""

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(message)
    self.code = code
    self.message = message


# ---------------------------------------------------------------------------------------------
# Version folders (pure functions over a base path).

def _folder_fingerprint(version_dir: str) -> tuple:
  """Names, sizes and times of a folder's files: what changes while a copy is still landing."""
  entries = []
  for root, _, files in tf.io.gfile.walk(version_dir):
    for name in files:
      stat = tf.io.gfile.stat(os.path.join(root, name))
      entries.append((os.path.join(root, name), stat.length, stat.mtime_nsec))
  return tuple(sorted(entries))


# ---------------------------------------------------------------------------------------------
# Tensors.

def tensor_from_proto(proto: tensor_pb2.TensorProto) -> np.ndarray:
  """A request tensor as an array (TF's own parser: tensor_content or the typed *_val fields)."""
  return tf.make_ndarray(proto)


def tensor_as_proto_field(array: np.ndarray) -> tensor_pb2.TensorProto:
  """An output tensor the way TF Serving's Predict writes it (`AsProtoField`: float_val, not bytes)."""
  if array.dtype != np.float32:
    return tf.make_tensor_proto(array)
  proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
  proto.tensor_shape.dim.extend(
      [proto.tensor_shape.Dim(size=int(size)) for size in array.shape])
  proto.float_val.extend(array.ravel().tolist())
  return proto


def _shape_text(dims) -> str:
  return '[' + ','.join(str(d) for d in dims) + ']'


def _dtype_name(dtype: int) -> str:
  try:
    return tf.dtypes.as_dtype(dtype).name
  except TypeError:
    return types_pb2.DataType.Name(dtype)


# ---------------------------------------------------------------------------------------------
# The model repository: which version is served, loaded and swapped by a poller.

@dataclasses.dataclass(frozen=True)
class ServedVersion:
  """One loaded version: its number, folder, SignatureDefs and callable signatures."""
  version: int
  path: str
  signature_defs: dict
  functions: dict


class ModelRepository:
  """Serves the highest complete version under a base path and follows new ones (the "latest" policy).

  Like TF Serving's AvailabilityPreservingPolicy, a new version is loaded before the old one is
  let go, and a version that fails to load leaves the old one serving.
  """

  def __init__(self, base_path: str, model_name: str = schema.MODEL_NAME):
    self.base_path = base_path
    self.model_name = model_name
    self._current: ServedVersion | None = None
    self._states: dict[int, tuple[int, str]] = {}   # version -> (State, error message)
    self._skipped: dict[int, tuple] = {}            # version -> fingerprint already judged incomplete
    self._lock = threading.Lock()

  @property
  def current(self) -> ServedVersion | None:
    return self._current

  def states(self) -> dict[int, tuple[int, str]]:
    with self._lock:
      return dict(self._states)

  def _set_state(self, version: int, state: int, message: str = '') -> None:
    with self._lock:
      self._states[version] = (state, message)

  def poll(self) -> bool:
    """Looks at the base path once; loads a newer complete version. Returns whether one was loaded."""
    current = self._current
    for version in reversed(list_versions(self.base_path)):
      if current is not None and version == current.version:
        return False
      path = os.path.join(self.base_path, str(version))
      fingerprint = _folder_fingerprint(path)
      if self._skipped.get(version) == fingerprint:
        continue
      reason = incomplete_reason(path)
      if reason is not None:
        if version not in self._skipped:
          _log.warning('serve: not loading %s yet: %s', path, reason)
        self._skipped[version] = fingerprint
        continue
      self._skipped.pop(version, None)
      return self._load(version, path, fingerprint)
    return False

  def _load(self, version: int, path: str, fingerprint: tuple) -> bool:
    self._set_state(version, _State.LOADING)
    try:
      loaded = tf.saved_model.load(path)
      served = ServedVersion(version, path, read_signature_defs(path),
                             {name: loaded.signatures[name] for name in loaded.signatures})
    except Exception as error:  # pylint: disable=broad-except
      # A broken version must not take the server down; the old one keeps serving.
      _log.error('serve: loading %s failed: %s', path, error)
      self._set_state(version, _State.END, f'{type(error).__name__}: {error}')
      self._skipped[version] = fingerprint
      return False
    previous, self._current = self._current, served
    self._set_state(version, _State.AVAILABLE)
    if previous is not None:
      self._set_state(previous.version, _State.END)
    _log.info('serve: serving %s version %d from %s', self.model_name, version, path)
    return True

  def resolve(self, model_spec) -> ServedVersion:
    """The version a request's ModelSpec names, or the NOT_FOUND / INVALID_ARGUMENT TF Serving gives."""
    if model_spec.version_label:
      # No labels are configured here, as with a plain --model_base_path server.
      raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                     f'Unrecognized servable version label: {model_spec.version_label}')
    served = self._current
    if model_spec.HasField('version'):
      wanted = model_spec.version.value
      if model_spec.name != self.model_name or served is None or served.version != wanted:
        raise _Refusal(grpc.StatusCode.NOT_FOUND,
                       f'Servable not found for request: Specific({model_spec.name}, {wanted})')
    elif model_spec.name != self.model_name or served is None:
      raise _Refusal(grpc.StatusCode.NOT_FOUND,
                     f'Servable not found for request: Latest({model_spec.name})')
    return served


# ---------------------------------------------------------------------------------------------
# Fault injection.

@dataclasses.dataclass
class Faults:
  """What to do to Predict calls on purpose.

  Attributes:
    latency_secs: added before every Predict answer.
    failure_fraction: the share of Predict calls answered `failure_code` instead (0 to 1),
      drawn from a generator seeded with `seed`, so a run is repeatable in arrival order.
    failure_code: UNAVAILABLE or RESOURCE_EXHAUSTED (any gRPC code is accepted).
    seed: the generator's seed.
    refuse_image: a predicate on one image (uint8 [H, W, 3]); a request holding an image for
      which it is true is answered INVALID_ARGUMENT, as a model that chokes on one input would.
  """
  latency_secs: float = 0.0
  failure_fraction: float = 0.0
  failure_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
  seed: int = 0
  refuse_image: Callable[[np.ndarray], bool] | None = None


class _FaultInjector:
  """Applies `Faults` to calls, thread-safely and deterministically for a seed."""

  def __init__(self, faults: Faults):
    self._lock = threading.Lock()
    self.set(faults)

  def set(self, faults: Faults) -> None:
    with self._lock:
      self.faults = faults
      self._random = random.Random(faults.seed)

  def before_call(self) -> None:
    faults = self.faults
    if faults.latency_secs > 0:
      time.sleep(faults.latency_secs)
    if faults.failure_fraction > 0:
      with self._lock:
        fail = self._random.random() < faults.failure_fraction
      if fail:
        raise _Refusal(faults.failure_code, 'injected fault: the server is pretending to be '
                       f'{faults.failure_code.name.lower()}')

  def check_images(self, alias: str, array: np.ndarray) -> None:
    refuse = self.faults.refuse_image
    if refuse is None or array.ndim != 4:
      return
    for index, image in enumerate(array):
      if refuse(image):
        raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f'injected fault: input {alias} image {index} refused')


# ---------------------------------------------------------------------------------------------
# The services.

class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
  """Predict and GetModelMetadata, following predict_util.cc and get_model_metadata_impl.cc."""

  def __init__(self, repository: ModelRepository, faults: _FaultInjector, stats: '_Stats'):
    self._repository = repository
    self._faults = faults
    self._stats = stats

  def Predict(self, request, context):  # pylint: disable=invalid-name
    self._stats.record(request)
    try:
      self._faults.before_call()
      return self._predict(request)
    except _Refusal as refusal:
      context.abort(refusal.code, refusal.message)

  def _predict(self, request):
    served = self._repository.resolve(request.model_spec)
    signature_name = request.model_spec.signature_name or schema.SERVING_SIGNATURE
    signature = served.signature_defs.get(signature_name)
    if signature is None:
      # TF Serving answers FAILED_PRECONDITION here (predict_util.cc), not INVALID_ARGUMENT.
      raise _Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                     f'Serving signature key "{signature_name}" not found.')
    if signature.method_name != _PREDICT_METHOD or signature_name not in served.functions:
      raise _Refusal(grpc.StatusCode.INTERNAL,
                     'Expected prediction signature method_name to be one of '
                     f'{{{_PREDICT_METHOD}}}. Was: {signature.method_name}')
    inputs = self._inputs(signature, request)
    aliases = self._output_aliases(signature, request)
    try:
      outputs = served.functions[signature_name](**{
          alias: tf.constant(array) for alias, array in inputs.items()})
    except tf.errors.OpError as error:
      raise _Refusal(_CODES_BY_NUMBER.get(error.error_code, grpc.StatusCode.UNKNOWN),
                     error.message) from error
    except (TypeError, ValueError) as error:
      raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error
    response = predict_pb2.PredictResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = served.version
    response.model_spec.signature_name = signature_name
    for alias in aliases:
      response.outputs[alias].CopyFrom(tensor_as_proto_field(outputs[alias].numpy()))
    return response

  def _inputs(self, signature, request) -> dict[str, np.ndarray]:
    sent, wanted = set(request.inputs), set(signature.inputs)
    if len(sent) != len(wanted):
      raise _Refusal(
          grpc.StatusCode.INVALID_ARGUMENT,
          f'input size does not match signature: {len(sent)}!={len(wanted)} '
          f'len({{{",".join(sorted(sent))}}}) != len({{{",".join(sorted(wanted))}}}). '
          f'Sent extra: {{{",".join(sorted(sent - wanted))}}}. '
          f'Missing but required: {{{",".join(sorted(wanted - sent))}}}.')
    arrays = {}
    for position, (alias, info) in enumerate(sorted(signature.inputs.items())):
      if alias not in request.inputs:
        raise _Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f'Signature input alias: {alias}(feed name: {info.name}) not found in request and '
            f'no default value provided. Inputs expected to be in the request '
            f'{{{",".join(sorted(sent))}}}, or default input alias set: ')
      proto = request.inputs[alias]
      if proto.dtype != info.dtype:
        raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f'Expects arg[{position}] to be {_dtype_name(info.dtype)} but '
                       f'{_dtype_name(proto.dtype)} is provided')
      try:
        array = tensor_from_proto(proto)
      except Exception as error:  # pylint: disable=broad-except
        raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f'tensor parsing error: {alias}') from error
      expected = [d.size for d in info.tensor_shape.dim]
      if not info.tensor_shape.unknown_rank and (
          len(expected) != array.ndim or
          any(e not in (-1, a) for e, a in zip(expected, array.shape))):
        raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f'input {alias} has shape {_shape_text(array.shape)}, the signature '
                       f'expects {_shape_text(expected)} (-1: any size)')
      self._faults.check_images(alias, array)
      arrays[alias] = array
    return arrays

  @staticmethod
  def _output_aliases(signature, request) -> list[str]:
    aliases = []
    for alias in request.output_filter:
      if alias not in signature.outputs:
        raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f'output tensor alias not found in signature: {alias} Outputs expected to '
                       f'be in the set {{{",".join(sorted(signature.outputs))}}}.')
      if alias in aliases:
        raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f'duplicate output tensor alias: {alias}')
      aliases.append(alias)
    return aliases or sorted(signature.outputs)

  def GetModelMetadata(self, request, context):  # pylint: disable=invalid-name
    try:
      return self._metadata(request)
    except _Refusal as refusal:
      context.abort(refusal.code, refusal.message)

  def _metadata(self, request):
    if not request.HasField('model_spec'):
      raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, 'Missing ModelSpec')
    if not request.metadata_field:
      raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                     'GetModelMetadataRequest must specify at least one metadata_field')
    for field in request.metadata_field:
      if field != _METADATA_FIELD:
        raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, f'Metadata field {field} is not supported')
    served = self._repository.resolve(request.model_spec)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in served.signature_defs.items():
      signature_map.signature_def[name].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = self._repository.model_name
    response.model_spec.version.value = served.version
    response.metadata[_METADATA_FIELD].Pack(signature_map)
    return response


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
  """GetModelStatus, following get_model_status_impl.cc (versions let go stay listed as END)."""

  def __init__(self, repository: ModelRepository):
    self._repository = repository

  def GetModelStatus(self, request, context):  # pylint: disable=invalid-name
    spec = request.model_spec
    if not request.HasField('model_spec'):
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, 'Missing ModelSpec')
    states = self._repository.states() if spec.name == self._repository.model_name else {}
    if spec.HasField('version'):
      version = spec.version.value
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


class _Stats:
  """What the server saw, for tests: the serialized size of every Predict request."""

  def __init__(self):
    self._lock = threading.Lock()
    self.predict_request_bytes: list[int] = []

  def record(self, request) -> None:
    with self._lock:
      self.predict_request_bytes.append(request.ByteSize())


# ---------------------------------------------------------------------------------------------
# The server.

class LocalServingServer:
  """The local server: a repository, a poller thread, and a gRPC server that can stop and start again.

  Usage:
    server = LocalServingServer('EXPORT/PlanetModel', port=0, faults=Faults(failure_fraction=0.3))
    port = server.start()          # the model is loaded before it listens, as TF Serving does
    server.stop(); server.start()  # the same port again; the loaded model is kept
    server.close()

  Args:
    model_base_path: the folder holding the numbered versions (EXPORT/PlanetModel).
    port: the port to listen on; 0 picks a free one (kept for restarts).
    model_name: the name clients ask for.
    host: the interface; the default serves this machine only.
    poll_seconds: how often to look for a new version.
    max_receive_message_bytes: the largest request accepted (gRPC's default 4 MiB).
    ssl_key, ssl_cert: PEM bytes; with both, the server speaks TLS only.
    faults: faults to inject (see `Faults`); `set_faults` changes them while running.
    max_workers: threads answering calls.
  """

  def __init__(self, model_base_path: str, port: int = 0, *, model_name: str = schema.MODEL_NAME,
               host: str = '127.0.0.1', poll_seconds: float = DEFAULT_POLL_SECONDS,
               max_receive_message_bytes: int = GRPC_DEFAULT_MAX_MESSAGE_BYTES,
               ssl_key: bytes | None = None, ssl_cert: bytes | None = None,
               faults: Faults | None = None, max_workers: int = 8):
    if (ssl_key is None) != (ssl_cert is None):
      raise ValueError('TLS needs both ssl_key and ssl_cert')
    self.repository = ModelRepository(model_base_path, model_name)
    self.host = host
    self.port = port
    self._poll_seconds = poll_seconds
    self._max_receive = max_receive_message_bytes
    self._ssl = (ssl_key, ssl_cert) if ssl_key is not None else None
    self._faults = _FaultInjector(faults or Faults())
    self._stats = _Stats()
    self._max_workers = max_workers
    self._server: grpc.Server | None = None
    self._stop_polling = threading.Event()
    self._poller: threading.Thread | None = None

  @property
  def address(self) -> str:
    return f'{self.host}:{self.port}'

  @property
  def predict_request_bytes(self) -> list[int]:
    """The serialized size of every Predict request received so far."""
    return list(self._stats.predict_request_bytes)

  @property
  def served_version(self) -> int | None:
    current = self.repository.current
    return current.version if current else None

  def set_faults(self, faults: Faults) -> None:
    self._faults.set(faults)

  def start(self) -> int:
    """Loads the newest complete version (when there is one), listens, and returns the port."""
    if self._server is not None:
      raise RuntimeError(f'already serving on {self.address}')
    self.repository.poll()
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=self._max_workers,
                                              thread_name_prefix='serve'),
        options=[('grpc.max_receive_message_length', self._max_receive),
                 ('grpc.max_send_message_length', -1),
                 # Two servers must never share a port by accident (a restart must find it free).
                 ('grpc.so_reuseport', 0)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _PredictionService(self.repository, self._faults, self._stats), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(self.repository), server)
    target = f'{self.host}:{self.port}'
    try:
      if self._ssl:
        credentials = grpc.ssl_server_credentials([self._ssl])
        bound = server.add_secure_port(target, credentials)
      else:
        bound = server.add_insecure_port(target)
    except RuntimeError as error:
      raise OSError(f'cannot listen on {target}: {error}') from error
    if not bound:
      raise OSError(f'cannot listen on {target}')
    self.port = bound
    server.start()
    self._server = server
    self._stop_polling.clear()
    self._poller = threading.Thread(target=self._poll_loop, name='serve-poller', daemon=True)
    self._poller.start()
    _log.info('serve: listening on %s (%s)', self.address, 'TLS' if self._ssl else 'plaintext')
    return self.port

  def _poll_loop(self) -> None:
    while not self._stop_polling.wait(self._poll_seconds):
      try:
        self.repository.poll()
      except Exception as error:  # pylint: disable=broad-except
        # A file system hiccup must not stop the server from following new versions.
        _log.warning('serve: polling %s failed: %s', self.repository.base_path, error)

  def stop(self, grace: float | None = None) -> None:
    """Stops listening (in-flight calls end after `grace` seconds, at once by default)."""
    self._stop_polling.set()
    if self._poller is not None:
      self._poller.join()
      self._poller = None
    if self._server is not None:
      self._server.stop(grace).wait()
      self._server = None

  close = stop

  def wait(self) -> None:
    if self._server is not None:
      self._server.wait_for_termination()

  def __enter__(self) -> 'LocalServingServer':
    self.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self.stop()


class ModelServerProcess:
  """The real `tensorflow_model_server` as a child process, behind `LocalServingServer`'s API.

  So that the same tests run against TF Serving itself where its binary is on the PATH.

  Usage:
    with ModelServerProcess('EXPORT/PlanetModel') as server:
      channel = grpc.insecure_channel(server.address)
  """

  def __init__(self, model_base_path: str, port: int = 0, *, model_name: str = schema.MODEL_NAME,
               poll_seconds: int = 1, binary: str = 'tensorflow_model_server',
               startup_timeout_secs: float = 60.0):
    self._base_path = os.path.abspath(model_base_path)
    self.port = port
    self.host = '127.0.0.1'
    self._model_name = model_name
    self._poll_seconds = max(1, int(poll_seconds))
    self._binary = binary
    self._timeout = startup_timeout_secs
    self._process = None
    self._log_path = None

  @property
  def address(self) -> str:
    return f'{self.host}:{self.port}'

  def start(self) -> int:
    """Starts the binary and waits until a version is AVAILABLE; returns the port."""
    if not self.port:
      with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        self.port = probe.getsockname()[1]
    log = tempfile.NamedTemporaryFile('w+b', prefix='tensorflow_model_server-', suffix='.log',
                                      delete=False)
    self._log_path = log.name
    self._process = subprocess.Popen(
        [self._binary, f'--port={self.port}', f'--model_name={self._model_name}',
         f'--model_base_path={self._base_path}',
         f'--file_system_poll_wait_seconds={self._poll_seconds}'],
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    channel = grpc.insecure_channel(self.address)
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = self._model_name
    deadline = time.monotonic() + self._timeout
    try:
      while time.monotonic() < deadline:
        if self._process.poll() is not None:
          raise RuntimeError(f'{self._binary} exited with {self._process.returncode}: '
                             f'{self._log_tail()}')
        try:
          states = stub.GetModelStatus(request, timeout=2).model_version_status
          if any(s.state == _State.AVAILABLE for s in states):
            return self.port
        except grpc.RpcError:
          pass
        time.sleep(0.2)
    finally:
      channel.close()
    self.stop()
    raise TimeoutError(f'{self._binary} served nothing within {self._timeout:g}s: '
                       f'{self._log_tail()}')

  def _log_tail(self) -> str:
    with open(self._log_path, 'rb') as f:
      return f.read()[-2000:].decode('utf-8', 'replace')

  def stop(self, grace: float | None = None) -> None:
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=grace or 10)
      except Exception:  # pylint: disable=broad-except
        self._process.kill()
        self._process.wait()
      self._process = None

  close = stop

  def __enter__(self) -> 'ModelServerProcess':
    self.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self.stop()


def _read_file(path: str | None) -> bytes | None:
  if path is None:
    return None
  with tf.io.gfile.GFile(path, 'rb') as f:
    return f.read()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description='A TF Serving-compatible gRPC server for development and tests '
                  '(production: tensorflow_model_server).')
  parser.add_argument('--model_base_path', required=True, help='EXPORT/PlanetModel: numbered versions')
  parser.add_argument('--port', type=int, default=8500)
  parser.add_argument('--model_name', default=schema.MODEL_NAME)
  parser.add_argument('--host', default='127.0.0.1',
                      help='interface to listen on (0.0.0.0: every interface, as TF Serving does)')
  parser.add_argument('--file_system_poll_wait_seconds', type=float, default=DEFAULT_POLL_SECONDS)
  parser.add_argument('--ssl_cert_file', help='PEM certificate; with --ssl_key_file, serve TLS only')
  parser.add_argument('--ssl_key_file', help='PEM private key of --ssl_cert_file')
  parser.add_argument('--inject_latency_secs', type=float, default=0.0,
                      help='fault injection: delay every Predict answer')
  parser.add_argument('--inject_failure_fraction', type=float, default=0.0,
                      help='fault injection: answer this share of Predict calls with an error')
  parser.add_argument('--inject_failure_code', default='UNAVAILABLE',
                      choices=['UNAVAILABLE', 'RESOURCE_EXHAUSTED', 'DEADLINE_EXCEEDED', 'INTERNAL'])
  parser.add_argument('--seed', type=int, default=0, help='fault injection: random seed')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
  server = LocalServingServer(
      args.model_base_path, args.port, model_name=args.model_name, host=args.host,
      poll_seconds=args.file_system_poll_wait_seconds,
      ssl_key=_read_file(args.ssl_key_file), ssl_cert=_read_file(args.ssl_cert_file),
      faults=Faults(args.inject_latency_secs, args.inject_failure_fraction,
                    grpc.StatusCode[args.inject_failure_code], args.seed))
  server.start()
  if server.served_version is None:
    _log.warning('serve: no complete version under %s yet; waiting for one', args.model_base_path)
  try:
    server.wait()
  except KeyboardInterrupt:
    server.stop()


if __name__ == '__main__':
  main()
