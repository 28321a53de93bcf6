"""Stage manifests: a small JSON file each stage writes last, and the next stage checks first.

A folder without `manifest.json` is a stage that did not finish (or is still running), so it is
never consumed. All access goes through Beam's FileSystems: local paths and gs:// alike.
"""
import hashlib
import json
import time

from apache_beam.io.filesystems import FileSystems

from model import schema

__all__ = ['is_local_path', 'manifest_path', 'ManifestMissing', 'read_manifest', 'sha256_of_file',
           'utc_timestamp', 'write_json_atomic', 'write_manifest']


class ManifestMissing(FileNotFoundError):
  """The folder has no manifest: its stage did not finish."""


def manifest_path(output_dir: str) -> str:
  return FileSystems.join(output_dir, schema.MANIFEST_FILE)


def is_local_path(path: str) -> bool:
  """A path on this machine's file system, not an object store's URL (gs://...)."""
  return '://' not in path


def utc_timestamp(seconds: float | None = None) -> str:
  """`seconds` since the epoch (default: now) as the one timestamp format every stage writes."""
  return time.strftime(schema.TIMESTAMP_FORMAT, time.gmtime(seconds))


def write_json_atomic(path: str, value) -> str:
  """Writes `value` as JSON at `path` (local or gs://) through a temporary name, so a reader
  never sees half a file; returns `path`."""
  temporary = path + '.tmp'
  with FileSystems.create(temporary) as f:
    f.write(json.dumps(value, indent=2, sort_keys=True, default=str).encode('utf-8'))
  if FileSystems.exists(path):
    FileSystems.delete([path])
  FileSystems.rename([temporary], [path])
  return path


def write_manifest(output_dir: str, manifest: dict) -> str:
  """Writes `manifest` as OUTPUT_DIR/manifest.json (via a temporary name); returns the path."""
  return write_json_atomic(manifest_path(output_dir), manifest)


def read_manifest(output_dir: str, expected_stage: str | None = None) -> dict:
  """Reads a stage's manifest, refusing a folder whose stage did not finish.

  Raises:
    ManifestMissing: no manifest.json in `output_dir`.
    ValueError: the manifest was written by another stage than `expected_stage`.
  """
  path = manifest_path(output_dir)
  if not FileSystems.exists(path):
    raise ManifestMissing(
        f'{output_dir} has no {schema.MANIFEST_FILE}: the stage that writes it did not finish '
        '(or is still running). Run it again (with --overwrite) and use its output once it ends.')
  with FileSystems.open(path) as f:
    manifest = json.loads(f.read().decode('utf-8'))
  if expected_stage and manifest.get('stage') != expected_stage:
    raise ValueError(f'{path} was written by stage {manifest.get("stage")!r}, '
                     f'not {expected_stage!r}: point this command at a {expected_stage} output')
  return manifest


def sha256_of_file(path: str, chunk_bytes: int = 1 << 20) -> str:
  digest = hashlib.sha256()
  with FileSystems.open(path) as f:
    while chunk := f.read(chunk_bytes):
      digest.update(chunk)
  return digest.hexdigest()
