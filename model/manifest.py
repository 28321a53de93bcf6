"""Stage manifests: a small JSON file each stage writes last, and the next stage checks first.

A folder without `manifest.json` is a stage that did not finish (or is still running), so it is
never consumed. All access goes through Beam's FileSystems: local paths and gs:// alike.
"""
import hashlib
import json
import time

from apache_beam.io.filesystems import FileSystems

from model import schema

__all__ = [
    'claim_output_dir', 'manifest_path', 'ManifestMissing', 'read_manifest', 'sha256_of_file',
    'utc_timestamp', 'write_json_atomic', 'write_manifest'
]


class ManifestMissing(FileNotFoundError):
  """The folder has no manifest: its stage did not finish."""


def manifest_path(output_dir: str) -> str:
  return FileSystems.join(output_dir, schema.MANIFEST_FILE)


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


def claim_output_dir(output_dir: str, overwrite: bool) -> None:
  """Makes `output_dir` ready for a new run, or refuses with what to do.

  A folder holding a finished run (a manifest) or the remains of an unfinished one is only reused
  with `overwrite`, and then cleared first: stale outputs must never mix with new ones.
  """
  if not FileSystems.exists(output_dir):
    return
  # '**', not '*': a killed job leaves its partial files in Beam's beam-temp-* sub-folders.
  leftovers = FileSystems.match([FileSystems.join(output_dir, '**')])[0].metadata_list
  if not leftovers:
    return
  if not overwrite:
    state = ('holds a finished run' if FileSystems.exists(manifest_path(output_dir))
             else 'holds files of an unfinished run (no manifest)')
    raise FileExistsError(f'{output_dir} {state}; choose another --output_dir or pass '
                          '--overwrite to clear it first')
  FileSystems.delete([output_dir])
