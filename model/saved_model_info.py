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
from model.export import list_versions


class ExportError(ValueError):
  """An export that cannot be served: missing, partial, tampered, or with the wrong signature."""


@dataclasses.dataclass(frozen=True)
class ExportInfo:
  version_dir: str
  version: str
  image_size: int
  ground_thresholds: tuple[float, ...]
  info: dict          # the whole planet.json


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


def verify_checksums(version_dir: str) -> None:
  """Refuses a version whose files differ from the SHA256SUMS the export wrote."""
  sums_path = os.path.join(version_dir, schema.EXPORT_CHECKSUMS_FILE)
  if not tf.io.gfile.exists(sums_path):
    raise ExportError(f'{version_dir} has no {schema.EXPORT_CHECKSUMS_FILE}: not a complete '
                      'export of this project; export it again')
  with tf.io.gfile.GFile(sums_path) as f:
    expected = dict(reversed(line.split('  ', 1)) for line in f.read().splitlines() if line)
  for relative, digest in expected.items():
    path = os.path.join(version_dir, relative)
    if not tf.io.gfile.exists(path):
      raise ExportError(f'{path} is missing: the version folder is incomplete (a partial copy?)')
    with tf.io.gfile.GFile(path, 'rb') as f:
      if hashlib.sha256(f.read()).hexdigest() != digest:
        raise ExportError(f'{path} does not match its checksum in {schema.EXPORT_CHECKSUMS_FILE}: '
                          'the export was modified or partly copied; copy it again')


def serving_image_size(version_dir: str, signature: str = schema.SERVING_SIGNATURE) -> int:
  """The H (= W) of the signature's `images` input, checked to be uint8 [-1, H, H, 3]."""
  proto = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(os.path.join(version_dir, 'saved_model.pb'), 'rb') as f:
    proto.ParseFromString(f.read())
  signatures = proto.meta_graphs[0].signature_def
  if signature not in signatures:
    raise ExportError(f'{version_dir} has no signature {signature!r}; found {sorted(signatures)}')
  inputs = signatures[signature].inputs
  if schema.INPUT_IMAGES not in inputs:
    raise ExportError(f'signature {signature!r} of {version_dir} has inputs {sorted(inputs)}, '
                      f'expected {schema.INPUT_IMAGES!r}')
  tensor = inputs[schema.INPUT_IMAGES]
  dims = [d.size for d in tensor.tensor_shape.dim]
  if tensor.dtype != types_pb2.DT_UINT8 or len(dims) != 4 or dims[3] != 3 or dims[1] != dims[2] \
      or dims[1] < 1:
    raise ExportError(
        f'input {schema.INPUT_IMAGES!r} of {signature!r} is {types_pb2.DataType.Name(tensor.dtype)} '
        f'{dims}; expected DT_UINT8 [-1, H, H, 3]')
  missing = set(schema.OUTPUT_NAMES) - set(signatures[signature].outputs)
  if missing:
    raise ExportError(f'signature {signature!r} of {version_dir} lacks outputs {sorted(missing)}')
  return dims[1]


def inspect_export(model_dir: str, verify: bool = True) -> ExportInfo:
  """Resolves, verifies and describes an export; raises ExportError with what to do."""
  version_dir = resolve_version_dir(model_dir)
  if verify:
    verify_checksums(version_dir)
  image_size = serving_image_size(version_dir)
  with tf.io.gfile.GFile(os.path.join(version_dir, schema.EXPORT_INFO_FILE)) as f:
    info = json.load(f)
  if (info.get('weather_labels') != list(schema.WEATHER_LABELS)
      or info.get('ground_labels') != list(schema.GROUND_LABELS)):
    raise ExportError(f'{version_dir} was trained on other labels than this code knows: '
                      f'{info.get("weather_labels")} / {info.get("ground_labels")}')
  if info.get('image_size', image_size) != image_size:
    raise ExportError(f'{schema.EXPORT_INFO_FILE} says image size {info["image_size"]}, '
                      f'the signature says {image_size}')
  thresholds = tuple(float(t) for t in info.get(
      'ground_thresholds', [schema.DEFAULT_GROUND_THRESHOLD] * schema.NUM_GROUND))
  if len(thresholds) != schema.NUM_GROUND:
    raise ExportError(f'{schema.EXPORT_INFO_FILE} has {len(thresholds)} ground thresholds, '
                      f'expected {schema.NUM_GROUND}')
  return ExportInfo(version_dir, os.path.basename(version_dir.rstrip('/')), image_size,
                    thresholds, info)
