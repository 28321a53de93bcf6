"""Which model versions the local server serves: TF Serving's version-folder rules, its version
policies (the newest by default) and version labels (server_core.cc's label map)."""
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
from model.serving.model_config import VersionPolicy
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
  """Serves the complete versions under a base path that its policy wants (by default the highest,
  TF Serving's "latest" policy), follows new ones, and resolves labels.

  Like TF Serving's AvailabilityPreservingPolicy, a new version is loaded before an old one is
  let go, and a version that fails to load leaves the old one serving.

  Usage:
    repository = ModelRepository('EXPORT/PlanetModel')
    repository.poll()                                  # again every second, from a thread
    repository.set_labels({'stable': 3})               # from --model_config_file
    served = repository.resolve(request.model_spec)    # or a Refusal, as TF Serving answers
  """

  def __init__(self, base_path: str, model_name: str = schema.MODEL_NAME,
               version_policy: VersionPolicy = VersionPolicy()):
    self.base_path = base_path
    self.model_name = model_name
    self.version_policy = version_policy
    self._served: dict[int, ServedVersion] = {}
    self._labels: dict[str, int] = {}
    self._states: dict[int, tuple[int, str]] = {}   # version -> (State, error message)
    self._skipped: dict[int, tuple] = {}            # version -> fingerprint already judged incomplete
    self._lock = threading.Lock()

  @property
  def current(self) -> ServedVersion | None:
    """The highest version served (what a request without a version gets)."""
    served = self._served
    return served[max(served)] if served else None

  @property
  def served_versions(self) -> list[int]:
    return sorted(self._served)

  @property
  def labels(self) -> dict[str, int]:
    return dict(self._labels)

  def states(self) -> dict[int, tuple[int, str]]:
    """Every version seen so far -> (ModelVersionStatus.State, error message or '')."""
    with self._lock:
      return dict(self._states)

  def _set_state(self, version: int, state: int, message: str = '') -> None:
    with self._lock:
      self._states[version] = (state, message)

  def set_labels(self, labels: dict[str, int]) -> None:
    """Replaces the version labels; each must name a version being served (AVAILABLE).

    Raises:
      Refusal: FAILED_PRECONDITION with ServerCore's message; the labels are left as they were.
    """
    for label, version in sorted(labels.items()):
      if version not in self._served:
        raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                      f'Request to assign label to version {version} of model '
                      f'{self.model_name}, which is not currently available for inference')
    self._labels = dict(labels)

  def set_version_policy(self, policy: VersionPolicy) -> None:
    """A new policy, applied at the next `poll`."""
    self.version_policy = policy

  def poll(self) -> bool:
    """Looks at the base path once; loads the versions the policy wants and lets go of the
    others. Returns whether a version was loaded."""
    wanted, loaded = [], False
    for version in reversed(list_versions(self.base_path)):
      if not self.version_policy.wants(version, len(wanted)):
        continue
      if version in self._served:
        wanted.append(version)
        continue
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
      if self._load(version, path, fingerprint):
        wanted.append(version)
        loaded = True
    if wanted:   # never let go of the last version for want of a loadable one
      for version in set(self._served) - set(wanted):
        # As in TF Serving, a label does not keep its version loaded: asked for, it is then
        # NOT_FOUND until the labels move.
        self._served = {v: s for v, s in self._served.items() if v != version}
        self._set_state(version, _State.END)
    return loaded

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
    # One assignment of a new dict: a request on another thread sees the old or the new map.
    self._served = {**self._served, version: served}
    self._set_state(version, _State.AVAILABLE)
    _log.info('serve: serving %s version %d from %s', self.model_name, version, path)
    return True

  def label_version(self, model_name: str, label: str) -> int:
    """ServerCore::GetModelVersionForLabel: the version a label names, or INVALID_ARGUMENT."""
    version = self._labels.get(label) if model_name == self.model_name else None
    if version is None:
      raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                    f'Unrecognized servable version label: {label}')
    return version

  def resolve(self, model_spec) -> ServedVersion:
    """The version a request's ModelSpec names (by number, by label, or the latest), or the
    NOT_FOUND / INVALID_ARGUMENT TF Serving gives."""
    served = self._served
    name = model_spec.name
    if model_spec.version_label:
      wanted = self.label_version(name, model_spec.version_label)
    elif model_spec.HasField('version'):
      wanted = model_spec.version.value
    else:
      if name != self.model_name or not served:
        raise Refusal(grpc.StatusCode.NOT_FOUND,
                      f'Servable not found for request: Latest({name})')
      return served[max(served)]
    if name != self.model_name or wanted not in served:
      raise Refusal(grpc.StatusCode.NOT_FOUND,
                    f'Servable not found for request: Specific({name}, {wanted})')
    return served[wanted]
