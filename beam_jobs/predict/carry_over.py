"""The incremental prediction join: each image name with its file's sha256 and its earlier rows.

The images listed now and the earlier rows (--previous_output's predictions files and the part
files --resume keeps) meet in buckets by a hash of the image name: batches of a bucket's images
and of its earlier rows' lines are grouped by bucket, and each name of a bucket is then decided on
its own (`incremental.decide`). A bucket holds about `BUCKET_BYTES` of earlier rows (their count
follows from the files' sizes), so no worker ever holds all earlier rows, while Beam moves a few
hundred batches instead of one element per image: the carried path costs a read and a hash, a
parse and a rebuild per image, and little else. Hashing reads each file once with the same
bounded, regular-files-only read as decoding, in a few threads (hashlib and reads release the
GIL); the images left to predict then take the usual path.

Usage:
  carry = unique_images | 'CarryOver' >> CarryOver(config)
  carry['to_predict']   # (name, path): to read, decode and predict as usual
  carry['reused']       # the rows carried over or resumed, ready for the outputs (RowBatches)
  carry['removed']      # {'image_name', 'path'}: --previous_output's images gone from the inputs
  carry['kinds']        # {kind: count} per bundle: added up (add_counts), the summary's
                        # `incremental` counts
"""
import collections
import json
import math
from json.decoder import scanstring
from typing import Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from beam_jobs.common.buckets import BucketBatcher, name_bucket
from beam_jobs.common.image_files import read_image_file
from beam_jobs.common.lookahead import Lookahead, stop, thread_pool
from beam_jobs.common.metrics import counter, images_of_kind, unusable_rows
from beam_jobs.predict.config import JobConfig
from beam_jobs.predict.incremental import (CARRIED, REMOVED, RESUMED, decide, fingerprint,
                                           parse_known_row)
from beam_jobs.predict.rows import row_batch
from model.errors import InputRefused

__all__ = ['BUCKET_BYTES', 'BatchByBucket', 'CarryOver', 'Decide', 'FingerprintBatch',
           'ReadRowBatches', 'add_counts', 'bucket_count', 'fingerprint_file',
           'fingerprint_files', 'row_name']

BUCKET_BYTES = 8 << 20     # earlier rows per bucket: about 8,000 rows of about 1 KB
MIN_BUCKETS = 8            # enough for a few workers to share a small join
BATCH_SIZE = 500           # names per element through the join
_CURRENT = 'current'
# A row as the job writes it (json.dumps, sort_keys=True): the name follows the `ground` object.
_NAME_AFTER = '}, "image_name": "'


def bucket_count(row_bytes: int, bucket_bytes: int = BUCKET_BYTES) -> int:
  """How many buckets the join uses for `row_bytes` of earlier rows."""
  return max(MIN_BUCKETS, math.ceil(row_bytes / bucket_bytes))


def row_name(line: str) -> str | None:
  """The image name of an earlier row's line, found without parsing the whole row; None when
  the line holds none. `Decide` parses the row and drops it if its name is another."""
  at = line.find(_NAME_AFTER)
  if at >= 0:
    try:
      return scanstring(line, at + len(_NAME_AFTER))[0]
    except ValueError:
      pass
  try:   # a row written some other way (by hand): found by parsing it
    row = json.loads(line)
  except ValueError:
    return None
  name = row.get('image_name') if isinstance(row, dict) else None
  return name if isinstance(name, str) else None


def fingerprint_file(element, max_file_bytes: int):
  """(name, path) -> (name, path, sha256 of its bytes); sha256 None when it cannot be read
  (the image is then predicted, and dead-lettered with its reason by the decoding step)."""
  name, path = element
  try:
    return name, path, fingerprint(read_image_file(path, max_file_bytes))
  except InputRefused:
    return name, path, None


def add_counts(counts: Iterable[dict]) -> dict:
  """{kind: count} dicts added up."""
  total = collections.Counter()
  for count in counts:
    total.update(count)
  return dict(total)


class BatchByBucket(beam.DoFn):
  """(name, path) -> (bucket, ('current', [(name, path), ...])): at most BATCH_SIZE a batch, the
  rest of each bucket at the end of the bundle."""

  def __init__(self, buckets: int):
    self._buckets = buckets
    self._batcher = BucketBatcher(BATCH_SIZE)

  def start_bundle(self):
    self._batcher = BucketBatcher(BATCH_SIZE)

  def process(self, element):
    for bucket, batch in self._batcher.add(name_bucket(element[0], self._buckets), element):
      yield bucket, (_CURRENT, batch)

  def finish_bundle(self):
    for bucket, batch in self._batcher.drain():
      yield GlobalWindows.windowed_value((bucket, (_CURRENT, batch)))


def fingerprint_files(batch: list, max_file_bytes: int) -> list:
  """`fingerprint_file` of each (name, path) of `batch`, in order."""
  return [fingerprint_file(element, max_file_bytes) for element in batch]


class FingerprintBatch(beam.DoFn):
  """(bucket, ('current', [(name, path)])) -> the same with (name, path, sha256): read and hashed
  in a few threads, one slice of the batch each (one task per image cost as much as its hash).

  An image left to predict is read and hashed again by ReadAndDecode, on purpose: its bytes do not
  cross the join (every image's bytes in a grouping), and the row's sha256 must be of the bytes
  decoded, which a file changed between the two reads would not be."""

  def __init__(self, max_file_bytes: int, threads: int = 4):
    self._max_file_bytes = max_file_bytes
    self._threads = threads
    self._pool = None

  def setup(self):
    self._pool = thread_pool(self._threads, 'fingerprint')

  def process(self, element):
    bucket, (source, batch) = element
    step = math.ceil(len(batch) / self._threads)
    ahead = Lookahead(self._pool, self._threads)
    for start in range(0, len(batch), step):
      ahead.submit(fingerprint_files, batch[start:start + step], self._max_file_bytes)
    yield bucket, (source, [fingerprinted for done in ahead.drain() for fingerprinted in done])

  def teardown(self):
    stop(self._pool)


class ReadRowBatches(beam.DoFn):
  """An earlier rows file -> (bucket, (source, [(name, line), ...])), streamed: at most
  BATCH_SIZE lines a batch, so no more than one batch per bucket is held while reading."""

  def __init__(self, source: str, buckets: int):
    self._source = source
    self._buckets = buckets

  def process(self, path: str):
    batcher = BucketBatcher(BATCH_SIZE)
    unusable = 0
    with FileSystems.open(path) as f:
      for raw in f:
        try:
          line = raw.decode('utf-8').rstrip('\n')
        except UnicodeDecodeError:
          line = ''
        name = row_name(line)
        if name is None:
          unusable += 1
          continue
        for bucket, batch in batcher.add(name_bucket(name, self._buckets), (name, line)):
          yield bucket, (self._source, batch)
    for bucket, batch in batcher.drain():
      yield bucket, (self._source, batch)
    if unusable:
      counter(unusable_rows(self._source)).inc(unusable)


class Decide(beam.DoFn):
  """(bucket, batches) -> (name, path) to predict on the main output, the reused rows of each of
  its batches as a `rows.RowBatch` ('reused'), or a removed image ('removed'); {kind: count} of
  each bundle on 'kinds' (one element per bundle, not one per image).

  A bucket's earlier rows are parsed and held (about BUCKET_BYTES of them); its images are then
  decided batch by batch, and the earlier rows left over are the removed images.
  """

  def __init__(self, plan, thresholds):
    self._plan = plan
    self._thresholds = thresholds
    self._kinds = collections.Counter()

  def start_bundle(self):
    self._kinds = collections.Counter()

  def _earlier_rows(self, batches) -> dict:
    known = {'previous': collections.defaultdict(list), 'completed': collections.defaultdict(list)}
    for source, batch in batches:
      if source == _CURRENT:
        continue
      unusable = 0
      rows = known[source]
      for name, line in batch:
        row = parse_known_row(line)
        if row is None or row['image_name'] != name:
          unusable += 1
        else:
          rows[name].append(row)
      if unusable:
        counter(unusable_rows(source)).inc(unusable)
    return known

  def process(self, element):
    _, batches = element
    known = self._earlier_rows(batches)
    previous, completed = known['previous'], known['completed']
    kinds = collections.Counter()
    for source, batch in batches:
      if source != _CURRENT:
        continue
      reused = []
      for name, path, sha256 in batch:
        kind, value = decide(name, [(path, sha256)], previous.pop(name, []),
                             completed.pop(name, []), self._plan, self._thresholds)
        kinds[kind] += 1
        if kind in (CARRIED, RESUMED):
          reused.append(value)
        else:
          yield value
      if reused:
        yield beam.pvalue.TaggedOutput('reused', row_batch(reused))
    for name, rows in previous.items():   # earlier images gone from the inputs
      kinds[REMOVED] += 1
      yield beam.pvalue.TaggedOutput('removed', decide(name, [], rows, [], self._plan,
                                                       self._thresholds)[1])
    for kind, count in kinds.items():
      counter(images_of_kind(kind)).inc(count)
    self._kinds.update(kinds)

  def finish_bundle(self):
    if self._kinds:
      yield beam.pvalue.TaggedOutput('kinds', GlobalWindows.windowed_value(dict(self._kinds)))


def _total_bytes(files: tuple[str, ...]) -> int:
  if not files:
    return 0
  return sum(m.size_in_bytes for result in FileSystems.match(list(files))
             for m in result.metadata_list)


@beam.ptransform_fn
def CarryOver(images, config: JobConfig):  # pylint: disable=invalid-name
  """(name, path) of the unique images -> a dict of PCollections (see the module's usage)."""
  plan = config.carry
  buckets = bucket_count(_total_bytes(plan.previous_files + plan.completed_files))

  def earlier_rows(source: str, files: tuple[str, ...]):
    label = source.capitalize()
    return (images.pipeline
            | f'{label}RowFiles' >> beam.Create(files)
            | f'Spread{label}RowFiles' >> beam.Reshuffle()
            | f'Read{label}Rows' >> beam.ParDo(ReadRowBatches(source, buckets)))

  current = (images
             | 'BatchByBucket' >> beam.ParDo(BatchByBucket(buckets))
             | 'Fingerprint' >> beam.ParDo(FingerprintBatch(config.max_file_bytes)))
  decided = ((current, earlier_rows('previous', plan.previous_files),
              earlier_rows('completed', plan.completed_files))
             | 'AllBatches' >> beam.Flatten()
             | 'JoinByName' >> beam.GroupByKey()   # by bucket: by name within each
             | 'Decide' >> beam.ParDo(Decide(plan, config.thresholds)).with_outputs(
                 'reused', 'removed', 'kinds', main='to_predict'))
  return {'to_predict': decided.to_predict, 'reused': decided.reused,
          'removed': decided.removed, 'kinds': decided.kinds}
