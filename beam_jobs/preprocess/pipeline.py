"""The preprocess job's Beam graph: thin DoFns over the rules, composite transforms, the builder.

Usage:
  with TestPipeline() as p:
    outputs = build_pipeline(p, config)     # PreprocessOutputs: shards, dead letters, tally
"""
import json
import posixpath
from typing import Iterator, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_jobs.common import labels
from beam_jobs.common.buckets import BucketBatcher, name_bucket, unpacked
from beam_jobs.common.image_files import ImageSource, list_image_files
from beam_jobs.common.metrics import IMAGES_LISTED, counter
from beam_jobs.common.progress import ProgressCounter
from beam_jobs.common.tfrecord_sink import PublishShards, parts_dir_for
from beam_jobs.preprocess.config import IMAGE_EXTENSION, PreprocessConfig, images_dir_source
from beam_jobs.preprocess.dead_letter_sink import WriteDeadLetterFile
from beam_jobs.preprocess.encode import EncodeAndWriteExamples
from beam_jobs.preprocess.rules import (CSV_ROWS, DEAD_LETTERS, counter_name, join_one_bucket,
                                        raw_image_name, row_dead_letter, tally_key)
from model import schema
from model.errors import InputRefused

__all__ = ['JoinOneBucket', 'JoinRowsWithImages', 'ListImageFiles', 'ListImages',
           'PreprocessOutputs', 'READ_PHASE', 'ReadLabelRows', 'ReadLabels', 'WriteCounts',
           'build_pipeline', 'count_tally']

# The progress phase of CSV rows read (progress.ProgressCounter), counted every this many rows.
READ_PHASE = 'read'
_READ_PROGRESS_EVERY = 1024


class ReadLabelRows(beam.DoFn):
  """Labels CSV path -> lists of parsed rows (name, line, LabelRow.label_bits) by join bucket;
  refused lines to 'refused', and lists of their (name, line) to 'refused_names'.

  The whole file is read by one worker, in file order, because line numbers decide the
  duplicate rule. Parsing is microseconds a line, and the grouping by bucket that follows
  spreads the work, so no Reshuffle is needed here. The rows it read go to 'tally' as one
  (CSV_ROWS, count) pair, not one element a row. On a local run the rows read are counted into
  the progress folder as the 'read' phase: no row is settled before the join, which waits for
  the whole file, so without it the progress line would stand still while the CSV is read.
  """
  REFUSED = 'refused'
  REFUSED_NAMES = 'refused_names'
  TALLY = 'tally'

  def __init__(self, buckets: int, progress_folder: str | None = None):
    self._buckets = buckets
    self._progress = ProgressCounter(progress_folder)

  def process(self, path: str) -> Iterator:
    fmt, lines = labels.read_label_lines(path)
    rows, refused_names = BucketBatcher(packed=True), BucketBatcher(packed=True)
    count = 0
    for line, raw in lines:
      count += 1
      if not count % _READ_PROGRESS_EVERY:
        self._progress.add(_READ_PROGRESS_EVERY, phase=READ_PHASE)
      try:
        row = labels.parse_label_line(raw, fmt)
      except InputRefused as refusal:
        name = raw_image_name(raw)
        yield beam.pvalue.TaggedOutput(self.REFUSED, row_dead_letter(
            name or f'line:{line}', refusal.reason, refusal.message, 'parse_labels', line, path))
        if name:
          for batch in refused_names.add(name_bucket(name, self._buckets), (name, line)):
            yield beam.pvalue.TaggedOutput(self.REFUSED_NAMES, batch)
        continue
      yield from rows.add(name_bucket(row.image_name, self._buckets),
                          (row.image_name, line, row.label_bits))
    yield from rows.drain()
    for batch in refused_names.drain():
      yield beam.pvalue.TaggedOutput(self.REFUSED_NAMES, batch)
    yield beam.pvalue.TaggedOutput(self.TALLY, (CSV_ROWS, count))
    self._progress.write_now(count % _READ_PROGRESS_EVERY, phase=READ_PHASE)


class ListImageFiles(beam.DoFn):
  """An ImageSource -> lists of (image name, path) by join bucket, each counted under
  images_listed: every <images_dir>/*.jpg, the extension in any case (as the predict job lists
  images), FIFOs, links and folders so named too."""

  def __init__(self, buckets: int):
    self._buckets = buckets

  def setup(self):
    self._listed = counter(IMAGES_LISTED)

  def process(self, source: ImageSource) -> Iterator[tuple[int, list]]:
    files = BucketBatcher(packed=True)
    for path in list_image_files(source, (IMAGE_EXTENSION,)):   # any case: .JPG, .Jpg
      self._listed.inc()
      # posixpath, not FileSystems.split (10 us a call): every path here, local or gs://, is
      # '/'-separated.
      name = posixpath.basename(path)[:-len(IMAGE_EXTENSION)]
      yield from files.add(name_bucket(name, self._buckets), (name, path))
    yield from files.drain()


class JoinOneBucket(beam.DoFn):
  """(bucket, {'rows', 'refused', 'files'}: lists of each) -> one list of the bucket's
  LabelledImages (none when empty); dead letters to 'refused'."""
  REFUSED = 'refused'

  def __init__(self, images_dir: str):
    self._images_dir = images_dir

  def setup(self):
    # Joined once: FileSystems.join costs ~10 us a call (its file system lookup), and a CSV may
    # have a million rows without their files. A name never holds a '/' (labels.py refuses it).
    self._images_prefix = FileSystems.join(self._images_dir, '')

  def _expected_path(self, name: str) -> str:
    return self._images_prefix + name + IMAGE_EXTENSION

  def process(self, element) -> Iterator:
    _, grouped = element
    images = []
    for image, refused in join_one_bucket(
        unpacked(grouped['rows']), unpacked(grouped['refused']), unpacked(grouped['files']),
        self._expected_path):
      for record in refused:
        yield beam.pvalue.TaggedOutput(self.REFUSED, record)
      if image is not None:
        images.append(image)
    if images:
      yield images


def count_tally(key_and_count: tuple[str, int]) -> tuple[str, int]:
  """Adds a tally key's count to its Beam counter, and passes the pair on."""
  key, count = key_and_count
  # dead_letters/<REASON> is already counted, under the same name, where it is written
  # (dead_letter_sink.WriteDeadLetterParts).
  if not key.startswith(tally_key(DEAD_LETTERS, '')):
    counter(counter_name(key)).inc(count)
  return key_and_count


@beam.ptransform_fn
def ReadLabels(pipeline, labels_csv: str, buckets: int,  # pylint: disable=invalid-name
               progress_folder: str | None = None):
  """The labels CSV -> DoOutputsTuple: rows (bucket, [(name, line, label bits)]), refused,
  refused_names (bucket, [(name, line)]), tally."""
  return (pipeline
          | 'CsvPath' >> beam.Create([labels_csv])
          | 'ParseRows' >> beam.ParDo(ReadLabelRows(buckets, progress_folder)).with_outputs(
              ReadLabelRows.REFUSED, ReadLabelRows.REFUSED_NAMES, ReadLabelRows.TALLY,
              main='rows'))


@beam.ptransform_fn
def ListImages(pipeline, images_dir: str, buckets: int):  # pylint: disable=invalid-name
  """Every <images_dir>/*.jpg (the extension in any case) as (bucket, [(image name, path)])."""
  return (pipeline
          | 'ImagesDir' >> beam.Create([images_dir_source(images_dir)])
          | 'ListJpegs' >> beam.ParDo(ListImageFiles(buckets)))


@beam.ptransform_fn
def JoinRowsWithImages(inputs, images_dir: str):  # pylint: disable=invalid-name
  """{'rows', 'refused', 'files'} keyed by join bucket -> lists of LabelledImages; dead letters
  to 'refused'."""
  return (inputs
          | 'GroupByBucket' >> beam.CoGroupByKey()
          | 'ResolveAndJoin' >> beam.ParDo(JoinOneBucket(images_dir)).with_outputs(
              JoinOneBucket.REFUSED, main='images'))


@beam.ptransform_fn
def WriteCounts(tally, path: str):  # pylint: disable=invalid-name
  """(tally key, count) pairs -> one JSON object {key: total} at `path`: what the manifest's
  counts come from.

  Counted as data rather than read from metrics, so the manifest does not depend on how a runner
  reports metrics; the tests check that the counters agree.
  """
  return (tally
          | 'SumEach' >> beam.CombinePerKey(sum)
          | 'CountersOfEach' >> beam.Map(count_tally)
          | 'ToDict' >> beam.combiners.ToDict()
          | 'ToJson' >> beam.Map(lambda tally: json.dumps(tally, sort_keys=True))
          | 'Write' >> beam.io.WriteToText(path, shard_name_template='', num_shards=1))


class PreprocessOutputs(NamedTuple):
  """The PCollections a test may assert on."""
  shards: dict[str, beam.PCollection]   # split -> one element: the sorted shard paths
  dead_letters: tuple                   # each refusing step's PCollection of dict records
  tally: beam.PCollection               # (tally key, count) pairs, before they are summed


def _split_index(split_and_part: tuple[str, tuple[int, str]], num_partitions: int) -> int:
  del num_partitions
  return schema.SPLITS.index(split_and_part[0])


def build_pipeline(p: beam.Pipeline, config: PreprocessConfig,
                   progress_folder: str | None = None) -> PreprocessOutputs:
  """Builds the whole job on `p` (a Pipeline, or a TestPipeline in tests).

  Args:
    p: the pipeline.
    config: the validated configuration.
    progress_folder: a `ProgressTally` folder to count settled CSV rows into (a local run).
  """
  parsed = p | 'ReadLabels' >> ReadLabels(config.labels_csv, config.join_buckets, progress_folder)
  files = p | 'ListImages' >> ListImages(config.images_dir, config.join_buckets)

  joined = ({'rows': parsed.rows, 'refused': parsed[ReadLabelRows.REFUSED_NAMES], 'files': files}
            | 'JoinRowsWithImages' >> JoinRowsWithImages(config.images_dir))

  # Read, hash, decode, serialise and write in one step: only part names leave it.
  parts_dirs = {split: parts_dir_for(config.shard_prefix(split)) for split in schema.SPLITS}
  encoded = (joined.images
             | 'EncodeExamples' >> beam.ParDo(EncodeAndWriteExamples(
                 config, parts_dirs, progress_folder)).with_outputs(
                     EncodeAndWriteExamples.REFUSED, EncodeAndWriteExamples.TALLY, main='parts'))

  parts_by_split = encoded.parts | 'SplitTrainEval' >> beam.Partition(
      _split_index, len(schema.SPLITS))
  num_shards = dict(config.num_shards)
  shards = {}
  for split, split_parts in zip(schema.SPLITS, parts_by_split):
    name = split.capitalize()
    shards[split] = (split_parts
                     | f'PartsOf{name}' >> beam.Values()
                     | f'Write{name}' >> PublishShards(config.shard_prefix(split),
                                                       num_shards[split], config.compression,
                                                       parts_dirs[split]))

  # Each step's dead letters are written, tallied and counted as settled (a CSV row's) in the
  # step's own stage: never gathered in one PCollection, which a local runner would hold whole
  # until every step ends (dead_letter_sink.py).
  refused = (parsed[ReadLabelRows.REFUSED], joined[JoinOneBucket.REFUSED],
             encoded[EncodeAndWriteExamples.REFUSED])
  dead_letter_tally = refused | 'WriteDeadLetters' >> WriteDeadLetterFile(
      config.dead_letters_prefix, parts_dir_for(config.dead_letters_prefix), progress_folder)

  tally = ((parsed[ReadLabelRows.TALLY], dead_letter_tally, encoded[EncodeAndWriteExamples.TALLY])
           | 'AllTallies' >> beam.Flatten())
  _ = tally | 'WriteCounts' >> WriteCounts(config.counts_path)
  return PreprocessOutputs(shards, refused, tally)
