"""The preprocess job's dead-letter sink: each record written where it is refused, none grouped.

Not `dead_letters.WriteDeadLetters` (Beam's WriteToText with one shard): that groups every record
under one key, and a local runner holds the group, and the Flatten of the steps that refuse rows,
in memory: a CSV of 400,000 rows without their images took ~1.5 KB of memory per row. Here the
records of each step that refuses inputs go, in the same fused stage, to a DoFn that appends them
as JSON lines to its bundle's part file; only part names and the bundle's (tally key, count) pairs
leave it. The parts are then concatenated into the one file that readers and the manifest expect,
as Beam's sink would have named it: OUT/dead_letters/dead_letters-00000-of-00001.jsonl (empty
when nothing was refused). The counters are WriteDeadLetters' own: dead_letters and
dead_letters_<REASON>.

Usage:
  tally = ((refused_by_step_a, refused_by_step_b)
           | 'WriteDeadLetters' >> WriteDeadLetterFile(prefix, parts_dir_for(prefix), folder))
"""
import collections
import json
import uuid
from typing import Iterable, Iterator

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from beam_jobs.common.part_files import publish_parts, remove_parts_dir
from beam_jobs.common.metrics import counter
from beam_jobs.common.progress import ProgressCounter
from beam_jobs.preprocess.rules import (DEAD_LETTERED_ROWS, DEAD_LETTERS, counter_name,
                                        tally_dead_letter, tally_key)

__all__ = ['WriteDeadLetterFile', 'WriteDeadLetterParts', 'dead_letter_file_path',
           'publish_dead_letters']

_SUFFIX = '.jsonl'
_BY_REASON = tally_key(DEAD_LETTERS, '')


def dead_letter_file_path(file_path_prefix: str) -> str:
  """<prefix>-00000-of-00001.jsonl: the name WriteToText(num_shards=1) gives."""
  return f'{file_path_prefix}-00000-of-00001{_SUFFIX}'


class WriteDeadLetterParts(beam.DoFn):
  """Dead-letter records -> appended to this bundle's part file as JSON lines (sorted keys).

  Outputs, at the end of a bundle: main, the part's path (none when the bundle refused nothing);
  'tally', (tally key, count) for each key the bundle's records add to (rules.tally_dead_letter).
  A record of a CSV row is counted into the progress folder as settled when it is written.
  """
  TALLY = 'tally'

  def __init__(self, parts_dir: str, progress_folder: str | None = None):
    self._parts_dir = parts_dir
    self._progress = ProgressCounter(progress_folder)

  def start_bundle(self):
    self._path = None
    self._file = None
    self._tally = collections.Counter()

  def process(self, record: dict) -> Iterator:
    if self._file is None:
      self._path = FileSystems.join(self._parts_dir, uuid.uuid4().hex + _SUFFIX)
      self._file = FileSystems.create(self._path, compression_type=CompressionTypes.UNCOMPRESSED)
    self._file.write(json.dumps(record, sort_keys=True).encode('utf-8') + b'\n')
    keys = tally_dead_letter(record)
    self._tally.update(keys)
    if DEAD_LETTERED_ROWS in keys:
      self._progress.add(1)
    return iter(())

  def finish_bundle(self) -> Iterator:
    if self._file is not None:
      self._file.close()
      yield GlobalWindows.windowed_value(self._path)
    for key, count in sorted(self._tally.items()):
      yield beam.pvalue.TaggedOutput(self.TALLY, GlobalWindows.windowed_value((key, count)))
      # The other keys' counters are counted once summed (pipeline.count_tally).
      if key.startswith(_BY_REASON):
        counter(counter_name(key)).inc(count)
        counter(DEAD_LETTERS).inc(count)
    self._progress.write_now()
    self._file = None


def publish_dead_letters(_, file_path_prefix: str, parts_dir: str, parts: Iterable[str]) -> str:
  """The parts, one after another in name order, as the one dead-letter file
  (`part_files.publish_parts`: safe to run again); then the parts' folder removed. No part: an
  empty file."""
  path = publish_parts(sorted(parts), dead_letter_file_path(file_path_prefix))
  remove_parts_dir(parts_dir)
  return path


@beam.ptransform_fn
def WriteDeadLetterFile(refused: tuple, file_path_prefix: str,  # pylint: disable=invalid-name
                        parts_dir: str, progress_folder: str | None = None):
  """Dead letters from several steps -> one JSON-lines file; returns their tally pairs.

  Each step's records are written by a `WriteDeadLetterParts` of their own, fused with the step
  that refused them (a Flatten first would make a local runner hold every record until all the
  steps end). Only the part names are gathered, as a side input of the one publishing step.

  Args:
    refused: the PCollections of dead-letter records.
    file_path_prefix: OUT/dead_letters/dead_letters.
    parts_dir: a new folder for the parts (tfrecord_sink.parts_dir_for(file_path_prefix)).
    progress_folder: a `ProgressTally` folder to count settled CSV rows into (a local run).

  Returns:
    A PCollection of (tally key, count) pairs.
  """
  parts, tallies = [], []
  for step, records in enumerate(refused):
    written = records | f'WriteParts{step}' >> beam.ParDo(
        WriteDeadLetterParts(parts_dir, progress_folder)).with_outputs(
            WriteDeadLetterParts.TALLY, main='parts')
    parts.append(written.parts)
    tallies.append(written[WriteDeadLetterParts.TALLY])
  pipeline = refused[0].pipeline
  part_names = tuple(parts) | 'AllParts' >> beam.Flatten()
  _ = (pipeline
       | 'AfterParts' >> beam.Create([None])
       | 'Publish' >> beam.Map(publish_dead_letters, file_path_prefix, parts_dir,
                               parts=beam.pvalue.AsList(part_names)))
  return tuple(tallies) | 'Tallies' >> beam.Flatten()
