r"""Versioned, atomic SavedModel exports for TensorFlow Serving: <export_base>/PlanetModel/<N>/.

A version is written under a temporary dot-name beside the versions and renamed into place once
complete, because TF Serving (and our handlers) pick up any new numbered folder at once.

Usage: python -m model.export --checkpoint JOB/checkpoints/epoch_003.keras --export_base EXPORT \
         [--info_json JOB/metrics.json]
"""
from model import command_line

if __name__ == '__main__':
  # Before TensorFlow loads: its C++ libraries log as they load (model/command_line.py).
  command_line.quiet_third_party()

# pylint: disable=wrong-import-position,wrong-import-order
import hashlib
import json
import os
import re
import uuid

import tensorflow as tf

from model import schema
from model.output_layout import OutputRefused
# pylint: enable=wrong-import-position,wrong-import-order

__all__ = [
    'FINGERPRINT_KEY', 'check_export_base', 'export_model', 'info_from_metrics', 'list_versions',
    'main', 'model_dir', 'model_fingerprint'
]

# planet.json's key for the fingerprint, written at export and checked at load.
FINGERPRINT_KEY = 'model_fingerprint'

_VERSION_RE = re.compile(r'^\d+$')
# A version being written; TF Serving skips names that are not numbers.
_TEMPORARY_PREFIX = '.tmp-'


def model_dir(export_base: str) -> str:
  return os.path.join(export_base, schema.MODEL_NAME)


def list_versions(base_path: str) -> list[int]:
  """The complete version numbers under a PlanetModel/ folder, ascending (temporary names skipped)."""
  if not tf.io.gfile.isdir(base_path):
    return []
  return sorted(int(name.rstrip('/')) for name in tf.io.gfile.listdir(base_path)
                if _VERSION_RE.match(name.rstrip('/')))


def check_export_base(export_base: str) -> None:
  """Refuses an --export_base that holds anything but PlanetModel/ with its version folders.

  Exports only ever add a folder, but the base is where TF Serving looks for versions: a user's
  own files there would be served, or mistaken for ours.

  Raises:
    OutputRefused: naming a few of the entries that are not ours.
  """
  if not tf.io.gfile.exists(export_base):
    return
  if not tf.io.gfile.isdir(export_base):
    raise OutputRefused(f'--export_base {export_base} is a file, not a folder: give a folder path')
  unknown = [name for name in tf.io.gfile.listdir(export_base)
             if name.rstrip('/') != schema.MODEL_NAME]
  base = model_dir(export_base)
  if tf.io.gfile.isdir(base):
    unknown += [f'{schema.MODEL_NAME}/{name}' for name in tf.io.gfile.listdir(base)
                if not (_VERSION_RE.match(name.rstrip('/')) or name.startswith(_TEMPORARY_PREFIX))]
  if unknown:
    named = ', '.join(repr(n[:120]) for n in sorted(unknown)[:5])
    raise OutputRefused(
        f'--export_base {export_base} holds {len(unknown)} entries that are not model exports '
        f'({named}); it may hold only {schema.MODEL_NAME}/<version>/ folders. Choose another '
        '--export_base, or move those files out; nothing was touched')


def _model_files(version_dir: str) -> list[tuple[str, str]]:
  """(path relative to the version, full path) of every file that says what the model computes:
  all but assets.extra/, whose label order, thresholds and metrics are matched on their own."""
  found = []
  for root, _, files in tf.io.gfile.walk(version_dir):
    for name in files:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, version_dir)
      if not relative.startswith(os.path.dirname(schema.EXPORT_INFO_FILE) + '/'):
        found.append((relative, path))
  return sorted(found)


def model_fingerprint(version_dir: str) -> str:
  """What an export computes, as one digest: 'sha256:' and the first 32 hex digits of the sha256
  of its graph and variables files' own digests (every file but assets.extra/).

  Two exports that compute different things differ here, whatever their names and version
  numbers; the same export copied elsewhere does not. (Exporting the same weights again may give
  another fingerprint: the graph's bytes are not promised to be stable, and that only costs a
  prediction again.) The digests come from the export's SHA256SUMS when it has one (checked
  against the files by `saved_model_info.verify_checksums`), else from the files.
  """
  sums = os.path.join(version_dir, schema.EXPORT_CHECKSUMS_FILE)
  if tf.io.gfile.exists(sums):
    with tf.io.gfile.GFile(sums) as f:
      lines = [line.split('  ', 1) for line in f.read().splitlines() if '  ' in line]
    digests = sorted((relative, digest) for digest, relative in lines
                     if not relative.startswith(os.path.dirname(schema.EXPORT_INFO_FILE) + '/'))
  else:
    digests = []
    for relative, path in _model_files(version_dir):
      with tf.io.gfile.GFile(path, 'rb') as f:
        digests.append((relative, hashlib.sha256(f.read()).hexdigest()))
  text = ''.join(f'{digest}  {relative}\n' for relative, digest in digests)
  return 'sha256:' + hashlib.sha256(text.encode('utf-8')).hexdigest()[:32]


def _write_checksums(version_dir: str) -> None:
  """Records the sha256 of every file in the version, so a reader can refuse a partial copy."""
  lines = []
  for root, _, files in tf.io.gfile.walk(version_dir):
    for name in sorted(files):
      path = os.path.join(root, name)
      relative = os.path.relpath(path, version_dir)
      if relative == schema.EXPORT_CHECKSUMS_FILE:
        continue
      with tf.io.gfile.GFile(path, 'rb') as f:
        lines.append(f'{hashlib.sha256(f.read()).hexdigest()}  {relative}')
  with tf.io.gfile.GFile(os.path.join(version_dir, schema.EXPORT_CHECKSUMS_FILE), 'w') as f:
    f.write('\n'.join(sorted(lines, key=lambda l: l.split('  ', 1)[1])) + '\n')


def export_model(model, export_base: str, info: dict | None = None) -> str:
  """Exports a model built by `model.network.build_model` as the next version; returns its path.

  Signatures: `serving_default` (input `images`, uint8), `serving_tta` (the same input; each
  output the mean over the 8 flips/rotations of the chip: test-time augmentation, about 8x the
  compute) and `predict_float` (input `input_image`, float32 in [0, 1]); all output `weather` and
  `ground`. `assets.extra/planet.json` holds the label order, the image size, and whatever `info`
  adds (thresholds, metrics).
  """
  from model.network import CORE_NAME, dihedral_mean  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel

  image_size = int(model.input.shape[1])
  shape = [None, image_size, image_size, schema.CHANNELS]
  core = model.get_layer(CORE_NAME)

  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(
      name=schema.SERVING_SIGNATURE,
      fn=lambda images: model(images, training=False),
      input_signature=[tf.TensorSpec(shape, tf.uint8, name=schema.INPUT_IMAGES)])
  archive.add_endpoint(
      name=schema.TTA_SIGNATURE,
      fn=lambda images: dihedral_mean(model, images),
      input_signature=[tf.TensorSpec(shape, tf.uint8, name=schema.INPUT_IMAGES)])
  archive.add_endpoint(
      name=schema.FLOAT_SIGNATURE,
      fn=lambda input_image: core(input_image, training=False),
      input_signature=[tf.TensorSpec(shape, tf.float32, name=schema.INPUT_FLOAT)])

  check_export_base(export_base)
  base = model_dir(export_base)
  tf.io.gfile.makedirs(base)
  version = max(list_versions(base), default=0) + 1
  temporary = os.path.join(base, f'{_TEMPORARY_PREFIX}{version}-{uuid.uuid4().hex[:8]}')
  final = os.path.join(base, str(version))
  try:
    archive.write_out(temporary, verbose=False)
    info = {
        'model_name': schema.MODEL_NAME,
        'version': version,
        'image_size': image_size,
        'weather_labels': list(schema.WEATHER_LABELS),
        'ground_labels': list(schema.GROUND_LABELS),
        'ground_thresholds': [schema.DEFAULT_GROUND_THRESHOLD] * schema.NUM_GROUND,
        **(info or {}),
        FINGERPRINT_KEY: model_fingerprint(temporary),
    }
    tf.io.gfile.makedirs(os.path.join(temporary, os.path.dirname(schema.EXPORT_INFO_FILE)))
    with tf.io.gfile.GFile(os.path.join(temporary, schema.EXPORT_INFO_FILE), 'w') as f:
      json.dump(info, f, indent=2)
    _write_checksums(temporary)
    if tf.io.gfile.exists(final):  # another exporter won the race for this number
      raise FileExistsError(f'{final} appeared while exporting; export again')
    tf.io.gfile.rename(temporary, final)
  finally:
    if tf.io.gfile.exists(temporary):
      tf.io.gfile.rmtree(temporary)
  return final


def info_from_metrics(metrics: dict) -> dict:
  """The planet.json fields an export takes from model.train's JOB/metrics.json.

  The tuned ground thresholds (so predictions decide as the evaluation did) and a summary of the
  evaluation (so an export says how good it is without its JOB folder): the honest F2 (test half
  of eval, thresholds tuned on the other half) beside the tuned one and the one at 0.2.

  Raises:
    ValueError: the JSON holds no valid thresholds (it is not a model.train metrics.json).
  """
  thresholds = metrics.get('ground_thresholds')
  if (not isinstance(thresholds, list) or len(thresholds) != schema.NUM_GROUND
      or not all(isinstance(t, (int, float)) and 0 < t < 1 for t in thresholds)):
    raise ValueError(f'no ground_thresholds list of {schema.NUM_GROUND} values in (0, 1): '
                     'pass the metrics.json that model.train wrote in its --job_dir')
  evaluation = metrics.get('eval', {})
  summary = {
      'eval_mean_f2_honest': evaluation.get('mean_f2_honest'),
      'eval_mean_f2': evaluation.get('mean_f2'),
      'eval_mean_f2_default_thresholds': evaluation.get('mean_f2_default_thresholds'),
      'eval_mean_f2_honest_without_label_rule': evaluation.get(
          'mean_f2_honest_without_label_rule'),
      'label_rule': evaluation.get('label_rule'),
      'eval_halves': evaluation.get('halves'),
      'baseline_mean_f2': evaluation.get('baseline', {}).get('mean_f2'),
      'eval_examples': evaluation.get('examples'),
      'best_epoch': metrics.get('best_epoch'),
      'per_label': evaluation.get('per_label'),
  }
  return {'ground_thresholds': [float(t) for t in thresholds],
          'metrics': {k: v for k, v in summary.items() if v is not None}}


def main(argv=None):
  parser = command_line.ArgumentParser(prog='python -m model.export',
                                       description='Export a training checkpoint as the next version.')
  parser.add_argument('--checkpoint', type=command_line.user_path,
                      required=True, help='a .keras checkpoint written by model.train')
  parser.add_argument('--export_base', type=command_line.user_path,
                      required=True, help='exports go to EXPORT_BASE/PlanetModel/<N>')
  parser.add_argument('--info_json', type=command_line.user_path,
                      help='JOB/metrics.json from model.train: its tuned ground thresholds and '
                           'eval summary go into planet.json (default: thresholds of 0.2)')
  args = parser.parse_args(argv)
  check_export_base(args.export_base)
  info = None
  if args.info_json:   # read before loading the model: a wrong file fails in a second
    with tf.io.gfile.GFile(args.info_json) as f:
      metrics = json.load(f)
    info = info_from_metrics(metrics)
  import keras  # pylint: disable=import-outside-toplevel
  # model.network registers the layers a preset's checkpoint holds (BackbonePreprocess).
  from model import network  # pylint: disable=import-outside-toplevel,unused-import
  model = keras.models.load_model(args.checkpoint)
  if info and metrics.get('image_size') not in (None, int(model.input.shape[1])):
    raise ValueError(f'{args.info_json} is for {metrics["image_size"]} px images but '
                     f'{args.checkpoint} takes {int(model.input.shape[1])} px: pass the metrics '
                     'of the run that wrote the checkpoint')
  print(f'export: wrote {export_model(model, args.export_base, info)}')


if __name__ == '__main__':
  command_line.run_command('export', main, refusals=(OutputRefused, ValueError, OSError))
