"""The prediction job's completed work, kept as it is produced so that --resume can skip it.

Every prediction row inferred is also written, a few seconds after it is made, into a part file
under OUT/completed/: one JSON row per line, written under a temporary name and renamed, so a
part file is either whole or absent. Nothing but --resume reads them; every consumer reads the
published outputs, which appear with the manifest, and the job deletes the part files once the
manifest is written. A run killed at any point leaves every part file written before the kill;
rows inferred in the last few seconds before it are inferred again by the resumed run.

Usage:
  row_batches | 'KeepCompleted' >> beam.ParDo(KeepCompleted(output_dir))   # rows.RowBatch
  parts = list_completed(output_dir)    # before a resumed run's pipeline starts
  delete_completed(output_dir)          # after its manifest is written
"""
import fnmatch
import os
import threading
import time
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from model.manifest import is_local_path

__all__ = ['FILE_PATTERN', 'FOLDER', 'KeepCompleted', 'LAYOUT_PATTERNS', 'delete_completed',
           'is_part_file', 'list_completed', 'write_part']

FOLDER = 'completed'
FILE_PATTERN = f'{FOLDER}/part-*.jsonl'
# Everything this module may leave in OUT: whole part files and a part cut short by a kill.
LAYOUT_PATTERNS = (FILE_PATTERN, FILE_PATTERN + '.tmp')
# A part is written once this many rows wait, or once the oldest has waited this long: few
# files on a long run, and at most a few seconds of inference lost to a kill.
MAX_ROWS_PER_PART = 1000
MAX_WAIT_SECONDS = 3.0


def is_part_file(relative: str) -> bool:
  """Whether a path relative to OUT is a part file (whole or cut short)."""
  return any(fnmatch.fnmatchcase(relative, pattern) for pattern in LAYOUT_PATTERNS)


def write_part(output_dir: str, lines: list[str]) -> str:
  """Writes `lines` as one new part file, whole or not at all; returns its path."""
  path = FileSystems.join(output_dir, FOLDER, f'part-{uuid.uuid4().hex}.jsonl')
  with FileSystems.create(path + '.tmp') as f:
    f.write(''.join(line + '\n' for line in lines).encode('utf-8'))
  FileSystems.rename([path + '.tmp'], [path])
  return path


def list_completed(output_dir: str) -> tuple[str, ...]:
  """The whole part files in `output_dir`, sorted (a part cut short by a kill is not listed)."""
  pattern = FileSystems.join(output_dir, FILE_PATTERN)
  return tuple(sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list))


def delete_completed(output_dir: str) -> None:
  """Deletes the part files (the published outputs hold their rows) and their empty folder."""
  parts = [m.path for pattern in LAYOUT_PATTERNS
           for m in FileSystems.match([FileSystems.join(output_dir, pattern)])[0].metadata_list]
  if parts:
    FileSystems.delete(parts)
  if is_local_path(output_dir):   # object stores have no folders to leave behind
    try:
      os.rmdir(os.path.join(output_dir, FOLDER))
    except OSError:
      pass   # not there, or not empty: left as it is


class KeepCompleted(beam.DoFn):
  """Writes the rows of each `rows.RowBatch` it sees (their lines, as encoded for the predictions
  files) into part files under OUT/completed/; outputs nothing.

  A thread writes the waiting rows as a part when there are MAX_ROWS_PER_PART of them or the
  oldest has waited MAX_WAIT_SECONDS, so rows are kept even while the pipeline waits (a slow
  server, a long bundle: the local runner may process a whole stage as one bundle). The end of
  a bundle writes what is left, after any part being written, before the bundle commits. A
  retried bundle writes its rows again: --resume takes one row per image name and fingerprint,
  so a repeat is harmless.
  """

  def __init__(self, output_dir: str):
    self._output_dir = output_dir
    self._waiting_lock = None   # guards the waiting rows
    self._writing_lock = None   # one part written at a time: the bundle's end waits for it
    self._lines: list[str] = []
    self._oldest = 0.0
    self._stop = None

  def setup(self):
    self._waiting_lock, self._writing_lock = threading.Lock(), threading.Lock()
    self._lines = []
    self._stop = threading.Event()
    threading.Thread(target=self._write_when_due, name='keep-completed', daemon=True).start()

  def process(self, batch):
    with self._waiting_lock:
      if not self._lines:
        self._oldest = time.monotonic()
      self._lines.extend(batch.lines)

  def _write_waiting(self, due_only: bool) -> None:
    with self._writing_lock:
      with self._waiting_lock:
        due = (len(self._lines) >= MAX_ROWS_PER_PART
               or time.monotonic() - self._oldest >= MAX_WAIT_SECONDS)
        if not self._lines or (due_only and not due):
          return
        lines, self._lines = self._lines, []
      try:
        write_part(self._output_dir, lines)
      except Exception:
        with self._waiting_lock:   # kept for the next try
          self._lines[:0] = lines
        raise

  def _write_when_due(self):
    while not self._stop.wait(0.1):
      try:
        self._write_waiting(due_only=True)
      except Exception:  # pylint: disable=broad-except  # the bundle's end tries again, and fails
        time.sleep(1.0)

  def finish_bundle(self):
    self._write_waiting(due_only=False)

  def teardown(self):
    if self._stop:
      self._stop.set()
