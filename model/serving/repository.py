"""Which model version the local server serves: TF Serving's version-folder rules and "latest" policy."""
import dataclasses
import logging
import os
import threading

import grpc
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2

from model import schema
from model.export import list_versions
from model.saved_model_info import incomplete_reason
from model.saved_model_info import read_signature_defs
from model.serving.refusal import Refusal

__all__ = ['ModelRepository', 'ServedVersion']

_log = logging.getLogger('planet.serve')
_State = get_model_status_pb2.ModelVersionStatus.State


def _folder_fingerprint(version_dir: str) -> tuple:
  """Names, sizes and times of a folder's files: what changes while a copy is still landing."""
  entries = []
  for root, _, files in tf.io.gfile.walk(version_dir):
    for name in files:
      stat = tf.io.gfile.stat(os.path.join(root, name))
      entries.append((os.path.join(root, name), stat.length, stat.mtime_nsec))
  return tuple(sorted(entries))


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

  Usage:
    repository = ModelRepository('EXPORT/PlanetModel')
    repository.poll()                                  # again every second, from a thread
    served = repository.resolve(request.model_spec)    # or a Refusal, as TF Serving answers
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
    """Every version seen so far -> (ModelVersionStatus.State, error message or '')."""
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
      raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                    f'Unrecognized servable version label: {model_spec.version_label}')
    served = self._current
    if model_spec.HasField('version'):
      wanted = model_spec.version.value
      if model_spec.name != self.model_name or served is None or served.version != wanted:
        raise Refusal(grpc.StatusCode.NOT_FOUND,
                      f'Servable not found for request: Specific({model_spec.name}, {wanted})')
    elif model_spec.name != self.model_name or served is None:
      raise Refusal(grpc.StatusCode.NOT_FOUND,
                    f'Servable not found for request: Latest({model_spec.name})')
    return served
