"""The TF Serving backends' start-up check: does the server serve the model, at the input size?

`check_served_model` asks, over either transport, for the model's metadata (GetModelMetadata)
before the pipeline starts, so that a wrong address, model name, version, label, signature or
input size fails in one line instead of as a dead letter for every image. A model it does not
serve is answered with the versions it does (GetModelStatus); a server that does not answer, with
the transport's own advice (which server to start, or which port or protocol to use instead).

Usage:
  image_size, version = check_served_model(GrpcTransport('localhost:8500'), image_size=128)
"""
from typing import Any

import grpc
from tensorflow_serving.apis import get_model_metadata_pb2

from beam_jobs.predict.backends.retry_policy import CallFailed
from beam_jobs.predict.backends.transport import ServedModel, Transport
from model import schema
from model.saved_model_info import signature_image_size

__all__ = ['check_served_model', 'served_image_size']


def served_image_size(signature_map: get_model_metadata_pb2.SignatureDefMap, signature: str,
                      where: str, image_size: int | None = None) -> int:
  """The H (= W) of a served signature (GetModelMetadata's map), checked like an export on disk."""
  return signature_image_size(signature_map.signature_def, signature, where, image_size)


def _served_versions(transport: Transport, connection: Any, model_name: str,
                     timeout_secs: float) -> str:
  """'versions 3 (AVAILABLE), 2 (END)', or why they could not be listed."""
  try:
    states = transport.versions(connection, model_name, timeout_secs)
  except CallFailed as failure:
    return f'no versions ({transport.failure_text(failure)})'
  except ValueError as error:
    return f'no versions ({error})'
  return 'versions ' + ', '.join(f'{version} ({state})' for version, state in states.items())


def check_served_model(transport: Transport, model_name: str = schema.MODEL_NAME,
                       model_version: int | None = None,
                       signature: str = schema.SERVING_SIGNATURE, *,
                       image_size: int | None = None, timeout_secs: float = 10.0,
                       model_version_label: str | None = None) -> tuple[int, int]:
  """Asks the server for the model's metadata and checks it fits; returns (image_size, version).

  Call it before building the pipeline: a wrong address, model name, version, signature or input
  fails here with one line instead of as dead letters for every image.

  Raises:
    ValueError: naming what was expected and what was found.
  """
  model = ServedModel(model_name, model_version, model_version_label, signature)
  address = transport.address
  connection = transport.connect(1)
  try:
    try:
      found_name, found_version, signature_map = transport.metadata(connection, model,
                                                                    timeout_secs)
    except CallFailed as failure:
      if failure.code == grpc.StatusCode.NOT_FOUND:
        versions = _served_versions(transport, connection, model_name, timeout_secs)
        raise ValueError(f'{address} does not serve {model} ({failure.details}); for model '
                         f'{model_name!r} it has {versions}') from None
      if not failure.answered:
        raise ValueError(transport.unanswered_message(failure, timeout_secs)) from None
      raise ValueError(f'{address} refused the metadata request for {model}: '
                       f'{transport.failure_text(failure)}') from None
  finally:
    connection.close()
  if found_name != model_name:
    raise ValueError(f'{address} answered for model {found_name!r}; expected {model_name!r}')
  if model_version is not None and found_version != model_version:
    raise ValueError(f'{address} answered with version {found_version}; expected {model_version}')
  if signature_map is None:
    raise ValueError(f'{address} sent no signature_def metadata for {model}')
  where = f'{model_name} version {found_version} at {address}'
  return served_image_size(signature_map, signature, where, image_size), found_version


