"""What a TF Serving backend asks of its wire: the `Transport` contract, and the model it asks for.

A transport (`tf_serving.GrpcTransport`, `tf_serving_rest.RestTransport`) is all that differs
between the gRPC and the REST backend. For predictions it turns images into a request, sends it
once (the retry policy repeats the sending), and reads the answer into `(version, {output: array})`;
it says what its failures mean, as a `retry_policy.CallFailed` with the gRPC code TF Serving
meant; and it makes the metadata and status calls of the start-up check (`serving_check`). The
rest (batching, retries, throttling, dead letters, rows, messages) is `serving_base`'s, once.

Usage:
  model = ServedModel('PlanetModel', label='stable')    # or version=3, or neither: the latest
  connection = transport.connect(max_requests_in_flight=4)
  version, outputs = transport.decode(transport.send(
      connection, transport.encode(images, model), model, timeout_secs=30))
"""
import abc
import dataclasses
from typing import Any

import numpy as np
from apache_beam.io.filesystems import FileSystems
from tensorflow_serving.apis import get_model_metadata_pb2

from beam_jobs.predict.backends.retry_policy import CallFailed
from model import schema

__all__ = ['ServedModel', 'Transport', 'read_root_certificates']


def read_root_certificates(path: str) -> bytes:
  """A PEM file of trusted root certificates, from any path Beam can read (local, gs://)."""
  with FileSystems.open(path) as f:
    return f.read()


@dataclasses.dataclass(frozen=True)
class ServedModel:
  """What every request asks for: a model, and a version, a version label or (neither) the latest.

  Raises:
    ValueError: both a version and a label (TF Serving's ModelSpec holds one of them).
  """
  name: str = schema.MODEL_NAME
  version: int | None = None
  label: str | None = None
  signature: str = schema.SERVING_SIGNATURE

  def __post_init__(self):
    if self.version is not None and self.label is not None:
      raise ValueError(f'ask for a version ({self.version}) or a version label ({self.label!r}), '
                       'not both: TF Serving\'s ModelSpec holds one of them')

  def __str__(self) -> str:
    """'PlanetModel version 3', 'PlanetModel label stable' or 'PlanetModel (latest version)'."""
    if self.label is not None:
      return f'{self.name} label {self.label}'
    return (f'{self.name} version {self.version}' if self.version is not None else
            f'{self.name} (latest version)')


class Transport(abc.ABC):
  """One wire to TF Serving: what a `ServingHandler` and `check_served_model` need of it.

  A transport is plain configuration, pickled to the workers inside the handler; `connect` makes,
  on the worker, the connection that holds sockets. Its calls raise `CallFailed`.

  Attributes:
    name: 'grpc' or 'rest': the prefix of the Beam counters (grpc_requests, ...) and threads.
    address: the server as messages name it.
  """
  name: str
  address: str

  def image_bytes_within(self, max_request_bytes: int) -> int:
    """The image bytes a request may hold so that it stays within `max_request_bytes`."""
    return max_request_bytes

  @abc.abstractmethod
  def connect(self, max_requests_in_flight: int) -> Any:
    """A connection (with `close()`) good for `max_requests_in_flight` calls at once."""

  @abc.abstractmethod
  def encode(self, images: list[np.ndarray], model: ServedModel) -> Any:
    """One request's payload for same-shaped uint8 images."""

  @abc.abstractmethod
  def payload_bytes(self, payload: Any) -> int:
    """What the payload takes on the wire, as `max_request_bytes` counts it."""

  @abc.abstractmethod
  def send(self, connection: Any, payload: Any, model: ServedModel, timeout_secs: float) -> Any:
    """One attempt: the server's answer, or `CallFailed`."""

  @abc.abstractmethod
  def decode(self, answer: Any) -> tuple[int, dict[str, np.ndarray]]:
    """(the version that answered, {output name: array}); ValueError for an unusable answer."""

  @abc.abstractmethod
  def metadata(self, connection: Any, model: ServedModel, timeout_secs: float
               ) -> tuple[str, int, get_model_metadata_pb2.SignatureDefMap | None]:
    """(model name, version, signatures or None when not sent) from GetModelMetadata, waiting up
    to `timeout_secs` for a server that is still starting."""

  @abc.abstractmethod
  def versions(self, connection: Any, model_name: str, timeout_secs: float) -> dict[int, str]:
    """{version: state} from GetModelStatus, in the order messages list them."""

  @abc.abstractmethod
  def failure_text(self, failure: CallFailed) -> str:
    """A failure as the start-up check's messages quote it."""

  @abc.abstractmethod
  def unanswered_message(self, failure: CallFailed, timeout_secs: float) -> str:
    """What to say when no server answered the start-up check: which one to start, or which port."""
