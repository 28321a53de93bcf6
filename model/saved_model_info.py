"""Reads what an export promises without loading it: version, signature, image size, thresholds.

Used before a prediction pipeline starts (so a wrong export fails in seconds, with a message), by
the in-process handler and by the local serving server. Parses `saved_model.pb` as a protobuf;
loading the graph is left to whoever runs it.
"""
import dataclasses
import hashlib
import json
import os

import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2

from model import schema
from model.export import FINGERPRINT_KEY, list_versions, model_fingerprint

__all__ = [
    'ExportError', 'ExportInfo', 'incomplete_reason', 'inspect_export', 'read_signature_defs',
    'resolve_version_dir', 'signature_image_size', 'verify_checksums'
]


class ExportError(ValueError):
  """An export that cannot be served: missing, partial, tampered, or with the wrong signature."""


@dataclasses.dataclass(frozen=True)
class ExportInfo:
  version_dir: str
  version: str
  image_size: int
  ground_thresholds: tuple[float, ...]
  info: dict          # the whole planet.json
  fingerprint: str    # what the model computes (export.model_fingerprint)


def _is_complete(version_dir: str) -> bool:
  return all(tf.io.gfile.exists(os.path.join(version_dir, name))
             for name in ('saved_model.pb', schema.EXPORT_INFO_FILE))


def resolve_version_dir(model_dir: str) -> str:
  """A version folder as given, or the highest complete version under a PlanetModel/ folder."""
  model_dir = model_dir.rstrip('/')
  if tf.io.gfile.exists(os.path.join(model_dir, 'saved_model.pb')):
    return model_dir
  versions = [v for v in list_versions(model_dir) if _is_complete(os.path.join(model_dir, str(v)))]
  if not versions:
    found = tf.io.gfile.listdir(model_dir) if tf.io.gfile.isdir(model_dir) else 'no such folder'
    raise ExportError(
        f'no complete model version under {model_dir}: expected a SavedModel folder or numbered '
        f'version folders (1/, 2/, ...) each with saved_model.pb and {schema.EXPORT_INFO_FILE}; '
        f'found {found}. Export one with `python -m model.train` or `python -m model.export`.')
  return os.path.join(model_dir, str(versions[-1]))


def incomplete_reason(version_dir: str, require_checksums: bool = False) -> str | None:
  """Why a version folder cannot be served, or None when it is complete.

  A folder is complete when it has `saved_model.pb` and every file its `assets.extra/SHA256SUMS`
  lists exists with that checksum: a version copied file by file (gsutil cp, rsync) shows up
  numbered before its last byte lands. SavedModels from elsewhere have no SHA256SUMS; only
  `require_checksums` refuses them.
  """
  if not tf.io.gfile.exists(os.path.join(version_dir, 'saved_model.pb')):
    return 'no saved_model.pb'
  sums_path = os.path.join(version_dir, schema.EXPORT_CHECKSUMS_FILE)
  if not tf.io.gfile.exists(sums_path):
    return (f'no {schema.EXPORT_CHECKSUMS_FILE}: not a complete export of this project'
            if require_checksums else None)
  with tf.io.gfile.GFile(sums_path) as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  for line in lines:
    expected, _, relative = line.partition('  ')
    path = os.path.join(version_dir, relative)
    if not tf.io.gfile.exists(path):
      return f'{relative} is missing'
    with tf.io.gfile.GFile(path, 'rb') as f:
      if hashlib.sha256(f.read()).hexdigest() != expected:
        return f'{relative} does not match its checksum in {schema.EXPORT_CHECKSUMS_FILE}'
  return None


def verify_checksums(version_dir: str) -> None:
  """Refuses a version whose files differ from the SHA256SUMS the export wrote."""
  problem = incomplete_reason(version_dir, require_checksums=True)
  if problem:
    raise ExportError(f'{version_dir} cannot be used: {problem}. The export was modified or '
                      'partly copied: copy or export it again')


def read_signature_defs(version_dir: str) -> dict:
  """The SignatureDefs of a SavedModel's serving MetaGraph, as TF Serving reports them."""
  with tf.io.gfile.GFile(os.path.join(version_dir, 'saved_model.pb'), 'rb') as f:
    saved_model = saved_model_pb2.SavedModel.FromString(f.read())
  for meta_graph in saved_model.meta_graphs:
    if 'serve' in meta_graph.meta_info_def.tags:
      return dict(meta_graph.signature_def)
  raise ExportError(f'{version_dir} has no MetaGraph tagged "serve"')


def _shape(info) -> list[int] | None:
  if info.tensor_shape.unknown_rank:
    return None
  return [d.size for d in info.tensor_shape.dim]


def signature_image_size(signature_defs, signature: str, where: str,
                         image_size: int | None = None) -> int:
  """The H (= W) a signature takes, after checking it fits the project's contract.

  One check for an export on disk (`read_signature_defs`) and for a served model
  (GetModelMetadata's SignatureDefMap): uint8 `images` [-1, N, N, 3] in, float32 `weather`
  [-1, 4] and `ground` [-1, 13] out.

  Args:
    signature_defs: signature name -> SignatureDef.
    signature: the signature the job will call.
    where: 'PlanetModel version 3 at host:8500', for the messages.
    image_size: the resolution the caller expects, when it has one.

  Raises:
    ExportError (a ValueError): naming what was expected and what was found.
  """
  if signature not in signature_defs:
    found = sorted(k for k in signature_defs if not k.startswith('__'))
    if signature == schema.TTA_SIGNATURE:
      raise ExportError(
          f'{where} has no signature {signature!r} (test-time augmentation, --tta): it was '
          f'exported before that signature existed (it has {found}). Re-export it: python -m '
          'model.export --checkpoint JOB/checkpoints/epoch_NNN.keras --export_base EXPORT '
          '--info_json JOB/metrics.json; or predict without --tta')
    raise ExportError(f'{where} has no signature {signature!r}; it has {found}')
  found = signature_defs[signature]
  if set(found.inputs) != {schema.INPUT_IMAGES}:
    raise ExportError(f'signature {signature!r} of {where} takes inputs {sorted(found.inputs)}; '
                      f'expected one input {schema.INPUT_IMAGES!r}')
  info = found.inputs[schema.INPUT_IMAGES]
  if info.dtype != types_pb2.DT_UINT8:
    raise ExportError(f'input {schema.INPUT_IMAGES!r} of {where} ({signature}) is '
                      f'{types_pb2.DataType.Name(info.dtype)}; expected DT_UINT8')
  shape = _shape(info)
  if (shape is None or len(shape) != 4 or shape[3] != schema.CHANNELS or shape[1] <= 0 or
      shape[1] != shape[2]):
    raise ExportError(f'input {schema.INPUT_IMAGES!r} of {where} ({signature}) has shape '
                      f'{shape}; expected [-1, N, N, 3]')
  for name, width in ((schema.OUTPUT_WEATHER, schema.NUM_WEATHER),
                      (schema.OUTPUT_GROUND, schema.NUM_GROUND)):
    output = found.outputs.get(name)
    if output is None or output.dtype != types_pb2.DT_FLOAT or _shape(output) != [-1, width]:
      described = (f'{types_pb2.DataType.Name(output.dtype)} {_shape(output)}' if output
                   else f'missing (outputs: {sorted(found.outputs)})')
      raise ExportError(f'output {name!r} of {where} ({signature}) is {described}; '
                        f'expected DT_FLOAT [-1, {width}]')
  if image_size is not None and shape[1] != image_size:
    raise ExportError(f'{where} ({signature}) takes {shape[1]}x{shape[2]} images; expected '
                      f'{image_size}x{image_size}')
  return shape[1]


def inspect_export(model_dir: str, verify: bool = True,
                   signature: str = schema.SERVING_SIGNATURE) -> ExportInfo:
  """Resolves, verifies and describes an export whose `signature` a job will call; raises
  ExportError with what to do."""
  version_dir = resolve_version_dir(model_dir)
  if verify:
    verify_checksums(version_dir)
  image_size = signature_image_size(read_signature_defs(version_dir), signature, version_dir)
  with tf.io.gfile.GFile(os.path.join(version_dir, schema.EXPORT_INFO_FILE)) as f:
    info = json.load(f)
  if (info.get('weather_labels') != list(schema.WEATHER_LABELS)
      or info.get('ground_labels') != list(schema.GROUND_LABELS)):
    raise ExportError(f'{version_dir} was trained on other labels than this code knows: '
                      f'{info.get("weather_labels")} / {info.get("ground_labels")}')
  if info.get('image_size', image_size) != image_size:
    raise ExportError(f'{schema.EXPORT_INFO_FILE} says image size {info["image_size"]}, '
                      f'the signature says {image_size}')
  thresholds = info.get('ground_thresholds',
                        [schema.DEFAULT_GROUND_THRESHOLD] * schema.NUM_GROUND)
  if (not isinstance(thresholds, list) or len(thresholds) != schema.NUM_GROUND
      or not all(type(t) in (int, float) and 0 < t < 1 for t in thresholds)):
    # NaN, 0 or above 1 would decide every label the same way whatever the model says.
    raise ExportError(f'{version_dir}: {schema.EXPORT_INFO_FILE} must hold ground_thresholds, '
                      f'{schema.NUM_GROUND} numbers between 0 and 1 (exclusive); it holds '
                      f'{str(thresholds)[:200]}. Export it again with the metrics.json of its '
                      'training run')
  fingerprint = model_fingerprint(version_dir)
  recorded = info.get(FINGERPRINT_KEY)
  if verify and recorded is not None and recorded != fingerprint:
    raise ExportError(f'{version_dir}: {schema.EXPORT_INFO_FILE} records model fingerprint '
                      f'{str(recorded)[:80]}, but its files give {fingerprint}: the export was '
                      'put together from two exports or edited; copy or export it again')
  return ExportInfo(version_dir, os.path.basename(version_dir.rstrip('/')), image_size,
                    tuple(float(t) for t in thresholds), info, fingerprint)
