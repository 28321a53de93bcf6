"""Launches the real `tensorflow_model_server`, so that the local server's tests also run against it."""
import os
import socket
import subprocess
import tempfile
import time

import grpc
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc

from model import schema
from model.serving.protocol import open_channel

__all__ = ['ModelServerProcess']

_State = get_model_status_pb2.ModelVersionStatus.State


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


class ModelServerProcess:
  """The real `tensorflow_model_server` as a child process, behind `LocalServingServer`'s API.

  So that the same tests run against TF Serving itself where its binary is on the PATH.

  Usage:
    with ModelServerProcess('EXPORT/PlanetModel') as server:
      channel = grpc.insecure_channel(server.address)

  Args:
    model_base_path: the folder holding the numbered versions (EXPORT/PlanetModel).
    port: the port to listen on; 0 picks a free one.
    rest_api_port: the REST API's port (0 picks a free one); None: no REST API.
    model_name: the name clients ask for.
    poll_seconds: the server's --file_system_poll_wait_seconds (whole seconds, at least 1).
    binary: the server's executable.
    startup_timeout_secs: how long `start` waits for a version to become AVAILABLE.
  """

  def __init__(self, model_base_path: str, port: int = 0, *, rest_api_port: int | None = None,
               model_name: str = schema.MODEL_NAME,
               poll_seconds: int = 1, binary: str = 'tensorflow_model_server',
               startup_timeout_secs: float = 60.0):
    self._base_path = os.path.abspath(model_base_path)
    self.port = port
    self.rest_api_port = rest_api_port
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

  @property
  def rest_address(self) -> str | None:
    return None if self.rest_api_port is None else f'{self.host}:{self.rest_api_port}'

  def start(self) -> int:
    """Starts the binary and waits until a version is AVAILABLE; returns the port."""
    if not self.port:
      self.port = _free_port()
    if self.rest_api_port == 0:
      self.rest_api_port = _free_port()
    rest_flags = [] if self.rest_api_port is None else [f'--rest_api_port={self.rest_api_port}']
    log = tempfile.NamedTemporaryFile('w+b', prefix='tensorflow_model_server-', suffix='.log',
                                      delete=False)
    self._log_path = log.name
    self._process = subprocess.Popen(
        [self._binary, f'--port={self.port}', f'--model_name={self._model_name}',
         f'--model_base_path={self._base_path}',
         f'--file_system_poll_wait_seconds={self._poll_seconds}', *rest_flags],
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    channel = open_channel(self.address)
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
    """Terminates the process, waiting `grace` seconds (10 by default) before killing it."""
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
