"""Files written in parts and published as one: the parts' bytes, in order, as the final file.

Every sink of both jobs that cannot be Beam's own (the TFRecord shards, the preprocess dead
letters, submission.csv: each module says why) writes its records where they are made, into part
files in a folder of its own, and publishes them here: the parts' bytes one after another,
streamed (never held whole, never recompressed), then the parts and their folder deleted. Part
files concatenate because each format does: TFRecord framing, gzip members, lines.

Usage:
  path = publish_parts(sorted(parts), 'out/dead_letters/dead_letters-00000-of-00001.jsonl')
  publish_parts(parts, 'out/submission.csv', header=b'image_name,tags\\r\\n', staged_in=parts_dir)
  remove_parts_dir(parts_dir)     # once every file of the folder's parts is published
"""
import logging
import shutil
from typing import Sequence

from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

__all__ = ['COPY_CHUNK_BYTES', 'publish_parts', 'remove_parts_dir']

COPY_CHUNK_BYTES = 1 << 20   # a few calls per part, and little memory however large it is

_log = logging.getLogger('planet.part_files')


def publish_parts(parts: Sequence[str], path: str, header: bytes = b'',
                  staged_in: str | None = None) -> str:
  """`path` made of `header` and then the parts' bytes, in the order given; the parts deleted.

  A single part and no header is renamed, so its bytes are written once. With `staged_in` (a
  folder of the parts' own), the file is written there and renamed into place, so that no reader
  ever sees it half-written. Safe to run again after it succeeded (a retried step): the parts are
  then gone and `path` is there, and it is left as it is. No part: `header` alone.

  Returns:
    `path`.
  """
  if parts and not any(FileSystems.exists(part) for part in parts) and FileSystems.exists(path):
    return path   # published by an earlier attempt of this step
  if len(parts) == 1 and not header and staged_in is None:
    FileSystems.rename([parts[0]], [path])
    return path
  target = path if staged_in is None else FileSystems.join(staged_in, FileSystems.split(path)[1])
  with FileSystems.create(target, compression_type=CompressionTypes.UNCOMPRESSED) as out:
    out.write(header)
    for part in parts:
      with FileSystems.open(part, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        shutil.copyfileobj(f, out, COPY_CHUNK_BYTES)
  if staged_in is not None:
    if FileSystems.exists(path):   # left by a retried attempt of this step
      FileSystems.delete([path])
    FileSystems.rename([target], [path])
  if parts:   # one by one: on GCS a folder is only a prefix, and deleting it leaves its objects
    FileSystems.delete(list(parts))
  return path


def remove_parts_dir(parts_dir: str) -> None:
  """Removes a parts folder, best effort (as Beam's sinks remove their temporary folders).

  A folder no bundle wrote a part into was never made, and is not looked for. One that cannot be
  deleted (parts of failed bundles may remain there) is left for the next run's clean-up of the
  output folder (model/output_dir.py).
  """
  if not FileSystems.exists(parts_dir):
    return
  try:
    FileSystems.delete([parts_dir])
  except (IOError, BeamIOError):
    _log.info('could not delete %s (parts of failed bundles may remain there; the next run '
              'clears them)', parts_dir)
