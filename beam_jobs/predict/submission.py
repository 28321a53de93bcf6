"""submission.csv from ordered name buckets: no step holds every row on one worker.

The rows are split into buckets of consecutive names: the bucket boundaries are approximate
quantiles of the names (`beam.ApproximateQuantiles`, fed in batches), as many buckets as make
each hold about `rows_per_bucket` rows. Each bucket's lines are sorted by name and written as a
part file under a beam-temp-submission-<uuid>/ folder beside the output (a pattern the output
layout owns, so --overwrite of a killed run clears it); the header and the parts, in bucket order,
are then streamed into that folder's copy of the file, which is renamed into place, and the
folder is deleted (common/part_files.py). The file is the one that sorting all rows at once
would make: the header, then each row's `rows.submission_line` sorted by the image name as
Python orders strings (code points), CRLF, quoted as RFC 4180 says, a name starting with a
formula character prefixed with an apostrophe (`rows.spreadsheet_safe`).

Usage:
  row_batches | 'WriteSubmission' >> WriteSubmission('out/submission.csv')
"""
import bisect
import math
import uuid

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from beam_jobs.common.buckets import BucketBatcher
from beam_jobs.common.part_files import publish_parts, remove_parts_dir
from beam_jobs.common.metrics import SUBMISSION_BUCKETS, counter
from beam_jobs.predict.rows import SUBMISSION_HEADER as HEADER
from beam_jobs.predict.rows import RowBatch, submission_line

__all__ = ['DEFAULT_ROWS_PER_BUCKET', 'HEADER', 'WriteSubmission', 'bucket_boundaries',
           'concatenate_parts', 'write_bucket_part']

DEFAULT_ROWS_PER_BUCKET = 200_000   # about 60 MB of Python strings to sort on one worker
# Quantiles of the names computed: boundaries are picked among them, so a run can have up to
# QUANTILES - 1 buckets; each boundary is within count / QUANTILES ranks of its exact place.
QUANTILES = 1001
_BATCH = 1000            # names per element into the quantiles, lines per element into a bucket


def bucket_boundaries(quantiles: list[str], count: int, rows_per_bucket: int) -> list[str]:
  """Names that split `count` sorted names into buckets of about `rows_per_bucket` each.

  `quantiles` are the names at ranks 0, 1/(n-1), ..., 1 of them (their approximate quantiles).
  A name goes to the bucket `bisect_right(boundaries, name)`, so the buckets, taken in order,
  hold the names in order whatever the boundaries are: only their sizes depend on them.
  """
  buckets = max(1, math.ceil(count / rows_per_bucket))
  if buckets == 1 or len(quantiles) < 2:
    return []
  last = len(quantiles) - 1
  return sorted({quantiles[round(i * last / buckets)] for i in range(1, buckets)})


class SubmissionLines(beam.DoFn):
  """A `rows.RowBatch` -> its [(name, line), ...] on the main output, the names in batches on
  'names' (the input of the quantiles: one element per batch, not per row), and how many rows the
  bundle had on 'counts' (one element per bundle)."""

  def __init__(self):
    self._names = []
    self._count = 0

  def start_bundle(self):
    self._names = []
    self._count = 0

  def process(self, batch: RowBatch):
    pairs = [submission_line(row) for row in batch.rows]
    self._names.extend(name for name, _ in pairs)
    self._count += len(pairs)
    if len(self._names) >= _BATCH:
      yield beam.pvalue.TaggedOutput('names', self._names)
      self._names = []
    yield pairs

  def finish_bundle(self):
    if self._names:
      yield beam.pvalue.TaggedOutput('names', GlobalWindows.windowed_value(self._names))
    self._names = []
    yield beam.pvalue.TaggedOutput('counts', GlobalWindows.windowed_value(self._count))


class BucketLines(beam.DoFn):
  """[(name, line), ...] -> (bucket, [(name, line), ...]): at most _BATCH lines an element, the
  rest of each bucket at the end of the bundle."""

  def __init__(self):
    self._batcher = BucketBatcher(_BATCH)

  def start_bundle(self):
    self._batcher = BucketBatcher(_BATCH)

  def process(self, pairs, boundaries):
    for pair in pairs:
      yield from self._batcher.add(bisect.bisect_right(boundaries, pair[0]), pair)

  def finish_bundle(self):
    for bucket_and_batch in self._batcher.drain():
      yield GlobalWindows.windowed_value(bucket_and_batch)


def write_bucket_part(element, parts_dir: str) -> tuple[int, str]:
  """(bucket, batches of (name, line)) -> (bucket, its part file: the lines sorted by name)."""
  bucket, batches = element
  lines = sorted((pair for batch in batches for pair in batch), key=lambda pair: pair[0])
  path = FileSystems.join(parts_dir, f'part-{bucket:05d}-{uuid.uuid4().hex}.csv')
  with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(''.join(line for _, line in lines).encode('utf-8', 'surrogateescape'))
  counter(SUBMISSION_BUCKETS).inc()
  return bucket, path


def concatenate_parts(_, path: str, parts_dir: str, parts: list[tuple[int, str]]) -> str:
  """The header and the parts in bucket order, streamed into `path` through a copy in
  `parts_dir` renamed into place; then `parts_dir` is deleted. Returns `path`."""
  publish_parts([part for _, part in sorted(parts)], path, HEADER.encode('utf-8'),
                staged_in=parts_dir)
  remove_parts_dir(parts_dir)
  return path


@beam.ptransform_fn
def WriteSubmission(rows, path: str,  # pylint: disable=invalid-name
                    rows_per_bucket: int = DEFAULT_ROWS_PER_BUCKET):
  """`rows.RowBatch`es of prediction rows -> `path`, the submission.csv of all of them (see the
  module's docstring).

  Args:
    rows: `RowBatch`es of prediction rows (only `image_name` and `tags` are read); names are
      unique.
    path: the file to write.
    rows_per_bucket: about how many rows a worker sorts at once.

  Returns:
    A PCollection of one element: `path`, once it is written.
  """
  directory = FileSystems.split(path)[0]
  parts_dir = FileSystems.join(directory, f'beam-temp-submission-{uuid.uuid4().hex}')
  lines = rows | 'SubmissionLines' >> beam.ParDo(SubmissionLines()).with_outputs(
      'names', 'counts', main='lines')
  quantiles = lines.names | 'NameQuantiles' >> beam.ApproximateQuantiles.Globally(
      QUANTILES, input_batched=True)
  # The row count: one number per bundle, added up where it is used (a CombineGlobally would
  # be two more stages and six more steps for the same sum).
  boundaries = (rows.pipeline
                | 'BoundariesTrigger' >> beam.Create([None])
                | 'Boundaries' >> beam.Map(
                    lambda _, q, counts: bucket_boundaries(q, sum(counts), rows_per_bucket),
                    beam.pvalue.AsSingleton(quantiles), beam.pvalue.AsList(lines.counts)))
  parts = (lines.lines
           | 'BucketLines' >> beam.ParDo(BucketLines(), beam.pvalue.AsSingleton(boundaries))
           | 'GroupBuckets' >> beam.GroupByKey()
           | 'SortBuckets' >> beam.Map(write_bucket_part, parts_dir))
  return (rows.pipeline
          | 'ConcatenateTrigger' >> beam.Create([None])
          | 'Concatenate' >> beam.Map(concatenate_parts, path, parts_dir,
                                      parts=beam.pvalue.AsList(parts)))
