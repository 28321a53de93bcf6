"""Stage 1: labels CSV + JPEG folder -> train/eval TFRecord shards, dead letters and a manifest.

Usage:
  python -m beam_jobs.preprocess --labels_csv CSV --images_dir DIR --output_dir OUT \
      [--image_size 128] [--eval_fraction 0.2] [--num_shards N] [--compression none|gzip] \
      [--max_bad_fraction 0.05] [--max_file_bytes N] [--overwrite] [Beam pipeline options]

The same code runs on DirectRunner (in-process, or `--direct_running_mode=multi_processing
--direct_num_workers=N`) and on Dataflow (`--runner=DataflowRunner --project ... --region ...
--temp_location gs://... --setup_file ./setup.py`). Every path may be local or gs://.

Outputs under OUT:
  train/part-SSSSS-of-NNNNN.tfrecord[.gz]   eval/...   one Example per good image (model/schema.py)
  dead_letters/dead_letters-00000-of-00001.jsonl      one JSON line per input that is not an Example
  counts.json                                          the pipeline's own tally of everything
  manifest.json                                        written last, only when the job succeeded
  .planet-claim.json                                   written first: the folder is this job's

The output folder may hold nothing but these (see model/output_dir.py): a folder with other files,
or one that overlaps --images_dir or --labels_csv, is refused before anything is touched.

Every CSV row ends up exactly once as an Example or as a dead letter, so
csv_rows = examples[train] + examples[eval] + dead_lettered_rows, and the job checks it.
"""
import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
import zlib
from typing import Iterable, Iterator, NamedTuple

import apache_beam as beam
from apache_beam.io import tfrecordio
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState
from apache_beam.transforms.display import DisplayDataItem
from apache_beam.transforms.window import GlobalWindows

from beam_jobs.common import dead_letters, labels, runner_options
from beam_jobs.common.image_decoder import DEFAULT_MAX_PIXELS, decode_image
from beam_jobs.common.image_files import (DEFAULT_MAX_FILE_BYTES, ImageSource, list_image_files,
                                   read_image_file)
from beam_jobs.common.labels import LabelRow
from beam_jobs.common.progress import LogProgress, counter, query_counters, show_progress_logs
from model import command_line
from model import manifest as manifest_lib
from model import schema
from model.output_dir import OutputLayout, OutputRefused, claim_output_dir, with_beam_temporaries
from model.errors import InputRefused, Reason

STAGE = 'preprocess'
SPLITS = ('train', 'eval')
DEAD_LETTERS_DIR = 'dead_letters'
COUNTS_FILE = 'counts.json'
COMPRESSIONS = {'none': CompressionTypes.UNCOMPRESSED, 'gzip': CompressionTypes.GZIP}
SHARD_SUFFIXES = {'none': '.tfrecord', 'gzip': '.tfrecord.gz'}
IMAGE_EXTENSION = '.jpg'
# Everything this job writes under OUT: only these files are ever deleted by --overwrite.
LAYOUT = OutputLayout(STAGE, with_beam_temporaries(
    COUNTS_FILE, f'{DEAD_LETTERS_DIR}/dead_letters-?????-of-?????.jsonl',
    *(f'{split}/part-?????-of-?????{suffix}' for split in SPLITS
      for suffix in SHARD_SUFFIXES.values())))

# Shards of 100-200 MB: big enough that opening one costs nothing next to reading it, small
# enough that tf.data can interleave many and a lost worker redoes little.
MAX_SHARD_BYTES = 200 * 2**20
# An Example is its pixels plus name, sha256, shape and 17 labels (~250 bytes of protobuf).
EXAMPLE_OVERHEAD_BYTES = 256

_log = logging.getLogger('planet.preprocess')


class ConfigError(ValueError):
  """The job's configuration is wrong; raised before the pipeline starts."""


# ---------------------------------------------------------------------------------------------
# Pure functions: tested without a pipeline.
# ---------------------------------------------------------------------------------------------

def assign_split(image_name: str, eval_fraction: float) -> str:
  """Says which split an image belongs to, from its name alone.

  The first 8 bytes of sha256(name), read as a fraction of 2**64, put the image in eval when
  below `eval_fraction`. E.g. sha256('train_1') starts 0668b6398665dc06, i.e. 0.0250, so with
  eval_fraction=0.2 train_1 is in eval; sha256('train_0') starts 6cb944039553d0cc = 0.4247, so
  train_0 is in train. Stable across runs, machines, workers and Python versions (unlike
  Python's salted hash()), and monotone: raising eval_fraction only moves images from train to
  eval, never back.
  """
  position = int.from_bytes(hashlib.sha256(image_name.encode('utf-8')).digest()[:8], 'big')
  return 'eval' if position < eval_fraction * 2**64 else 'train'


def estimate_num_shards(csv_rows: int, image_size: int, split_fraction: float) -> int:
  """Shards for one split so that each holds at most MAX_SHARD_BYTES (100-200 MB when >1)."""
  example_bytes = image_size * image_size * schema.CHANNELS + EXAMPLE_OVERHEAD_BYTES
  return max(1, math.ceil(csv_rows * split_fraction * example_bytes / MAX_SHARD_BYTES))


def raw_image_name(raw: bytes) -> str:
  """The first field of a CSV line as text, for naming a line that could not be parsed."""
  text = raw.decode('utf-8', errors='replace')
  try:
    first = next(csv.reader([text]), [''])[0]
  except (csv.Error, IndexError):
    first = text.split(',', 1)[0]
  return first.strip()[:labels.MAX_NAME_CHARS]


def image_to_example(row: LabelRow, data: bytes, image_size: int,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
  """The hot path: one file's bytes, hashed and decoded once, to a serialised Example.

  Raises:
    InputRefused: from the decoder (EMPTY_FILE, NOT_AN_IMAGE, TRUNCATED_IMAGE, ...).
  """
  # Imported here so that importing this module (the driver, Dataflow job submission) does not
  # load TensorFlow; workers pay for it once, on their first image.
  from model.tf_example import build_example  # pylint: disable=import-outside-toplevel
  pixels = decode_image(data, image_size, max_pixels=max_pixels)
  return build_example(row, pixels, hashlib.sha256(data).hexdigest())


class LabelledImage(NamedTuple):
  """A CSV row that survived parsing and the duplicate rule, with the file it names."""
  image_name: str
  line: int
  row: LabelRow
  path: str


class EncodedExample(NamedTuple):
  """A good image: its split, its labels (for the tally) and the serialised Example."""
  split: str
  row: LabelRow
  serialized: bytes


def _row_refused(image_name: str, reason: Reason, message: str, step: str, line: int,
                 path: str | None = None) -> dict:
  # Row-level dead letters always carry their CSV line: conservation counts by it.
  return dead_letters.dead_letter(image_name, reason, message, STAGE, path, line=line, step=step)


def join_rows_with_image(image_name: str, rows: Iterable[tuple[int, LabelRow]],
                         refused_lines: Iterable[int], paths: Iterable[str],
                         expected_path: str) -> tuple[LabelledImage | None, list[dict]]:
  """Everything known about one image name -> the image to encode (or None) and dead letters.

  Args:
    image_name: the key all inputs below share.
    rows: (line, LabelRow) for every parsed CSV row with this name.
    refused_lines: lines that name this image but were refused while parsing (already
      dead-lettered; here only so that the image file is not reported as having no row).
    paths: the image files listed with this name (0 or 1).
    expected_path: where the row says the file is, for the MISSING_IMAGE message.

  Returns:
    (LabelledImage or None, dead-letter records). The duplicate rule (labels.resolve_duplicates)
    runs here, so that it sees every row with the name whatever the worker that parsed it.
  """
  rows, refused_lines, paths = list(rows), list(refused_lines), sorted(paths)
  refused = []
  kept = None
  if rows:
    kept, duplicates = labels.resolve_duplicates(rows)
    refused += [_row_refused(image_name, Reason.DUPLICATE_NAME, why, 'duplicates', line)
                for line, why in duplicates]
  if kept is not None:
    line = min(n for n, r in rows if r == kept)
    if paths:
      return LabelledImage(image_name, line, kept, paths[0]), refused
    refused.append(_row_refused(
        image_name, Reason.MISSING_IMAGE,
        f'no file {expected_path}: copy the image there, or drop its row from the CSV',
        'join_images', line, expected_path))
  elif paths and not rows and not refused_lines:
    # Not a CSV row, so it counts apart from conservation: listed so nobody wonders where it went.
    refused.append(dead_letters.dead_letter(
        image_name, Reason.IMAGE_WITHOUT_ROW,
        'the image is in the folder but no CSV row names it; it was not used', STAGE, paths[0],
        step='join_images'))
  return None, refused


def tally_dead_letter(record: dict) -> list[str]:
  """The tally keys one dead letter adds to (see `counts_from_tally`)."""
  keys = [f'dead_letters/{record["reason"]}']
  if record['reason'] == Reason.IMAGE_WITHOUT_ROW.value:
    keys.append('images_without_rows')
  elif 'line' in record:
    keys.append('dead_lettered_rows')
  return keys


def tally_example(example: EncodedExample) -> list[str]:
  """The tally keys one written Example adds to."""
  keys = [f'examples/{example.split}']
  keys += [f'labels/{example.split}/{label}' for label in example.row.tags]
  if not example.row.has_weather:
    keys.append('rows_without_weather')
  return keys


def counts_from_tally(tally: dict[str, int]) -> tuple[dict, dict]:
  """The manifest's `counts` and `label_counts` from the pipeline's flat tally."""
  def prefixed(prefix):
    return {k[len(prefix):]: v for k, v in sorted(tally.items()) if k.startswith(prefix)}
  counts = {
      'csv_rows': tally.get('csv_rows', 0),
      'examples': {split: tally.get(f'examples/{split}', 0) for split in SPLITS},
      'dead_letters': prefixed('dead_letters/'),
      'dead_lettered_rows': tally.get('dead_lettered_rows', 0),
      'images_without_rows': tally.get('images_without_rows', 0),
      'rows_without_weather': tally.get('rows_without_weather', 0),
  }
  label_counts = {split: {label: prefixed(f'labels/{split}/').get(label, 0)
                          for label in schema.ALL_LABELS} for split in SPLITS}
  return counts, label_counts


def check_conservation(counts: dict) -> None:
  """Every CSV row is an Example or a dead letter, exactly once; anything else is a bug."""
  accounted = sum(counts['examples'].values()) + counts['dead_lettered_rows']
  if accounted != counts['csv_rows']:
    raise AssertionError(
        f'{counts["csv_rows"]} CSV rows but {accounted} examples + dead-lettered rows: '
        'the job lost or duplicated rows; this is a bug, please report it with counts.json')


# ---------------------------------------------------------------------------------------------
# DoFns: thin wrappers over the functions above.
# ---------------------------------------------------------------------------------------------

class ReadLabelRows(beam.DoFn):
  """Labels CSV path -> parsed rows keyed by name; refused lines to 'refused' (+ their names).

  The whole file is read by one worker, in file order, because line numbers decide the
  duplicate rule. Parsing is microseconds a line, and the GroupByKey by name that follows
  spreads the work, so no Reshuffle is needed here.
  """
  REFUSED = 'refused'
  REFUSED_NAMES = 'refused_names'

  def setup(self):
    self._rows = counter('csv_rows')
    self._refused = counter('dead_lettered_rows')

  def process(self, path: str) -> Iterator:
    fmt, lines = labels.read_label_lines(path)
    for line, raw in lines:
      self._rows.inc()
      try:
        row = labels.parse_label_line(raw, fmt)
      except InputRefused as refusal:
        self._refused.inc()
        name = raw_image_name(raw)
        yield beam.pvalue.TaggedOutput(self.REFUSED, _row_refused(
            name or f'line:{line}', refusal.reason, refusal.message, 'parse_labels', line, path))
        if name:
          yield beam.pvalue.TaggedOutput(self.REFUSED_NAMES, (name, line))
        continue
      yield row.image_name, (line, row)


class JoinRowsWithImage(beam.DoFn):
  """(name, {'rows', 'refused', 'files'}) -> LabelledImage; dead letters to 'refused'."""
  REFUSED = 'refused'

  def __init__(self, images_dir: str):
    self._images_dir = images_dir

  def setup(self):
    self._without_row = counter('images_without_rows')
    self._refused = counter('dead_lettered_rows')

  def process(self, element) -> Iterator:
    name, grouped = element
    image, refused = join_rows_with_image(
        name, grouped['rows'], grouped['refused'], grouped['files'],
        FileSystems.join(self._images_dir, name + IMAGE_EXTENSION))
    for record in refused:
      if record['reason'] == Reason.IMAGE_WITHOUT_ROW.value:
        self._without_row.inc()
      else:
        self._refused.inc()
      yield beam.pvalue.TaggedOutput(self.REFUSED, record)
    if image is not None:
      yield image


class EncodeExample(beam.DoFn):
  """LabelledImage -> EncodedExample: read the bytes once, hash and decode those same bytes."""
  REFUSED = 'refused'

  def __init__(self, image_size: int, eval_fraction: float, max_pixels: int,
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    self._image_size = image_size
    self._eval_fraction = eval_fraction
    self._max_pixels = max_pixels
    self._max_file_bytes = max_file_bytes

  def setup(self):
    self._examples = {split: counter(f'examples_{split}') for split in SPLITS}
    self._labels = {(split, label): counter(f'labels_{split}_{label}')
                    for split in SPLITS for label in schema.ALL_LABELS}
    self._without_weather = counter('rows_without_weather')
    self._bytes_read = counter('image_bytes_read')
    self._refused = counter('dead_lettered_rows')

  def _refuse(self, image: LabelledImage, reason: Reason, message: str):
    self._refused.inc()
    return beam.pvalue.TaggedOutput(self.REFUSED, _row_refused(
        image.image_name, reason, message, 'decode_image', image.line, image.path))

  def process(self, image: LabelledImage) -> Iterator:
    try:
      data = read_image_file(image.path, self._max_file_bytes)
    except InputRefused as refusal:   # not a regular file, too large, gone, unreadable
      yield self._refuse(image, refusal.reason, refusal.message)
      return
    self._bytes_read.inc(len(data))
    try:
      serialized = image_to_example(image.row, data, self._image_size, self._max_pixels)
    except InputRefused as refusal:
      yield self._refuse(image, refusal.reason, refusal.message)
      return
    split = assign_split(image.image_name, self._eval_fraction)
    self._examples[split].inc()
    for label in image.row.tags:
      self._labels[split, label].inc()
    if not image.row.has_weather:
      self._without_weather.inc()
    yield EncodedExample(split, image.row, serialized)


def _count_image_listed(element):
  counter('images_listed').inc()
  return element


def _name_and_path(path: str) -> tuple[str, str]:
  file_name = FileSystems.split(path)[1]
  return file_name[:-len(IMAGE_EXTENSION)], path


# ---------------------------------------------------------------------------------------------
# Composite transforms: the graph reads like the design.
# ---------------------------------------------------------------------------------------------

@beam.ptransform_fn
def ReadLabels(pipeline, labels_csv: str):  # pylint: disable=invalid-name
  """The labels CSV -> DoOutputsTuple: rows (name, (line, LabelRow)), refused, refused_names."""
  return (pipeline
          | 'CsvPath' >> beam.Create([labels_csv])
          | 'ParseRows' >> beam.ParDo(ReadLabelRows()).with_outputs(
              ReadLabelRows.REFUSED, ReadLabelRows.REFUSED_NAMES, main='rows'))


@beam.ptransform_fn
def ListImages(pipeline, images_dir: str):  # pylint: disable=invalid-name
  """Every <images_dir>/*.jpg as (image name, path): FIFOs, links and folders so named too."""
  return (pipeline
          | 'ImagesDir' >> beam.Create([ImageSource.files_in(images_dir, IMAGE_EXTENSION)])
          | 'ListJpegs' >> beam.FlatMap(list_image_files, (IMAGE_EXTENSION,))
          | 'CountListed' >> beam.Map(_count_image_listed)
          | 'KeyByName' >> beam.Map(_name_and_path))


@beam.ptransform_fn
def JoinRowsWithImages(inputs, images_dir: str):  # pylint: disable=invalid-name
  """{'rows', 'refused', 'files'} keyed by name -> LabelledImage; dead letters to 'refused'."""
  return (inputs
          | 'GroupByName' >> beam.CoGroupByKey()
          | 'ResolveAndJoin' >> beam.ParDo(JoinRowsWithImage(images_dir)).with_outputs(
              JoinRowsWithImage.REFUSED, main='images'))


def shard_path(file_path_prefix: str, shard: int, num_shards: int, compression: str) -> str:
  """<prefix>-SSSSS-of-NNNNN.tfrecord[.gz], the names Beam's own file sinks give."""
  return f'{file_path_prefix}-{shard:05d}-of-{num_shards:05d}{SHARD_SUFFIXES[compression]}'


class WriteShardParts(beam.DoFn):
  """Serialised Examples -> one uncompressed TFRecord part per (bundle, shard): (shard, part path).

  A record's shard is the crc32 of its bytes modulo the number of shards: which shard holds an
  image does not depend on the runner or its bundles.
  """

  def __init__(self, parts_dir: str, num_shards: int, shard_pattern: str):
    self._parts_dir = parts_dir
    self._num_shards = num_shards
    self._shard_pattern = shard_pattern
    self._parts = {}

  def display_data(self):
    return {'file_pattern': DisplayDataItem(self._shard_pattern, label='File Pattern'),
            'shards': DisplayDataItem(self._num_shards, label='Number of Shards')}

  def start_bundle(self):
    self._parts = {}   # shard -> (part path, open file)

  def process(self, serialized: bytes):
    shard = zlib.crc32(serialized) % self._num_shards
    if shard not in self._parts:
      path = FileSystems.join(self._parts_dir, f'{shard:05d}-{uuid.uuid4().hex}.tfrecord')
      self._parts[shard] = path, FileSystems.create(
          path, compression_type=CompressionTypes.UNCOMPRESSED)
    # The record framing (length, masked crc32c) that WriteToTFRecord itself writes.
    write_record = tfrecordio._TFRecordUtil.write_record  # pylint: disable=protected-access
    write_record(self._parts[shard][1], serialized)

  def finish_bundle(self):
    for shard, (path, handle) in sorted(self._parts.items()):
      handle.close()
      yield GlobalWindows.windowed_value((shard, path))
    self._parts = {}


def concatenate_parts(element, file_path_prefix: str, num_shards: int, compression: str) -> str:
  """(shard, part paths) -> the shard: its parts one after another, compressed as written.

  Uncompressed TFRecord files concatenate into a valid TFRecord file; the parts are streamed,
  never held whole.
  """
  shard, parts = element
  parts = sorted(part for part in parts if part is not None)
  path = shard_path(file_path_prefix, shard, num_shards, compression)
  with FileSystems.create(path, compression_type=COMPRESSIONS[compression]) as out:
    for part in parts:
      with FileSystems.open(part, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        shutil.copyfileobj(f, out, 1 << 20)
  if parts:
    FileSystems.delete(parts)
  return path


def delete_parts_dir(_, parts_dir: str, written: list[str]) -> list[str]:
  """Removes the parts' folder once every shard is written (best effort, as Beam's sinks do)."""
  try:
    FileSystems.delete([parts_dir])
  except (IOError, BeamIOError):
    _log.info('could not delete %s (parts of failed bundles may remain there; the next run '
              'clears them)', parts_dir)
  return sorted(written)


@beam.ptransform_fn
def WriteSplit(examples, file_path_prefix: str, num_shards: int,  # pylint: disable=invalid-name
               compression: str):
  """Serialised Examples -> `num_shards` TFRecord shards <prefix>-SSSSS-of-NNNNN.tfrecord[.gz].

  Not `WriteToTFRecord(num_shards=N)`: it groups the records themselves by shard, and a runner
  without an external shuffle (the DirectRunner) holds that group in memory, so a local run's
  peak memory grew with the number of images (about 200 KB more per 128 px chip: 8 GB for the
  40,479 real chips). Here each bundle writes its records into one part file per shard, only the
  part names are grouped, and each shard is its parts concatenated (tests/test_reliability_serving).
  """
  directory, name = FileSystems.split(file_path_prefix)
  # Beside the shards, like Beam's beam-temp-* folders; a run that dies leaves it for the next
  # run's clean-up of the split folder.
  parts_dir = FileSystems.join(directory, f'beam-temp-{name}-parts-{uuid.uuid4().hex}')
  shard_pattern = (f'{file_path_prefix}-%(shard_num)05d-of-%(num_shards)05d'
                   f'{SHARD_SUFFIXES[compression]}')
  parts = (examples
           | 'Serialized' >> beam.Map(lambda example: example.serialized)
           | 'WriteParts' >> beam.ParDo(WriteShardParts(parts_dir, num_shards, shard_pattern)))
  # Every shard is written, an empty one too, so a split always has num_shards files.
  every_shard = (examples.pipeline
                 | 'EveryShard' >> beam.Create([(shard, None) for shard in range(num_shards)]))
  written = ((parts, every_shard)
             | 'WithEveryShard' >> beam.Flatten()
             | 'GroupPartsByShard' >> beam.GroupByKey()
             | 'ConcatenateParts' >> beam.Map(concatenate_parts, file_path_prefix, num_shards,
                                              compression))
  return (examples.pipeline
          | 'AfterShards' >> beam.Create([None])
          | 'DeleteParts' >> beam.Map(delete_parts_dir, parts_dir,
                                      written=beam.pvalue.AsList(written)))


@beam.ptransform_fn
def WriteCounts(tally_keys, path: str):  # pylint: disable=invalid-name
  """Tally keys -> one JSON object {key: count} at `path`: what the manifest's counts come from.

  Counted as data rather than read from metrics, so the manifest does not depend on how a runner
  reports metrics; the tests check that the counters agree.
  """
  return (tally_keys
          | 'CountEach' >> beam.combiners.Count.PerElement()
          | 'ToDict' >> beam.combiners.ToDict()
          | 'ToJson' >> beam.Map(lambda tally: json.dumps(tally, sort_keys=True))
          | 'Write' >> beam.io.WriteToText(path, shard_name_template='', num_shards=1))


# ---------------------------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Everything the pipeline needs, validated (see `validate_config`)."""
  labels_csv: str
  images_dir: str
  output_dir: str
  image_size: int = schema.DEFAULT_IMAGE_SIZE
  eval_fraction: float = 0.2
  num_shards: tuple[tuple[str, int], ...] = (('train', 1), ('eval', 1))
  compression: str = 'none'
  max_bad_fraction: float = 0.05
  max_pixels: int = DEFAULT_MAX_PIXELS
  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

  def shard_prefix(self, split: str) -> str:
    return FileSystems.join(self.output_dir, split, 'part')

  @property
  def dead_letters_prefix(self) -> str:
    return FileSystems.join(self.output_dir, DEAD_LETTERS_DIR, 'dead_letters')

  @property
  def counts_path(self) -> str:
    return FileSystems.join(self.output_dir, COUNTS_FILE)


class PreprocessOutputs(NamedTuple):
  """The PCollections a test may assert on."""
  examples: beam.PCollection       # EncodedExample
  dead_letters: beam.PCollection   # dict records
  tally_keys: beam.PCollection     # str


def _split_index(example: EncodedExample, num_partitions: int) -> int:
  del num_partitions
  return SPLITS.index(example.split)


def build_pipeline(p: beam.Pipeline, config: PreprocessConfig) -> PreprocessOutputs:
  """Builds the whole job on `p` (a Pipeline, or a TestPipeline in tests)."""
  parsed = p | 'ReadLabels' >> ReadLabels(config.labels_csv)
  rows = parsed.rows | 'LogRows' >> beam.ParDo(LogProgress('preprocess: csv rows read'))
  files = p | 'ListImages' >> ListImages(config.images_dir)

  joined = ({'rows': rows, 'refused': parsed[ReadLabelRows.REFUSED_NAMES], 'files': files}
            | 'JoinRowsWithImages' >> JoinRowsWithImages(config.images_dir))

  encoded = (joined.images
             | 'EncodeExamples' >> beam.ParDo(EncodeExample(
                 config.image_size, config.eval_fraction, config.max_pixels,
                 config.max_file_bytes)).with_outputs(
                     EncodeExample.REFUSED, main='examples'))
  examples = (encoded.examples
              | 'LogExamples' >> beam.ParDo(LogProgress('preprocess: images encoded')))

  by_split = examples | 'SplitTrainEval' >> beam.Partition(_split_index, len(SPLITS))
  shards = dict(config.num_shards)
  for split, split_examples in zip(SPLITS, by_split):
    _ = (split_examples
         | f'Write{split.capitalize()}' >> WriteSplit(
             config.shard_prefix(split), shards[split], config.compression))

  refused = ((parsed[ReadLabelRows.REFUSED], joined[JoinRowsWithImage.REFUSED],
              encoded[EncodeExample.REFUSED])
             | 'AllDeadLetters' >> beam.Flatten())
  _ = refused | 'WriteDeadLetters' >> dead_letters.WriteDeadLetters(config.dead_letters_prefix)

  tally_keys = ((rows | 'TallyRows' >> beam.Map(lambda _: 'csv_rows'),
                 parsed[ReadLabelRows.REFUSED] | 'TallyRefusedRows' >> beam.Map(
                     lambda _: 'csv_rows'),
                 refused | 'TallyDeadLetters' >> beam.FlatMap(tally_dead_letter),
                 examples | 'TallyExamples' >> beam.FlatMap(tally_example))
                | 'AllTallyKeys' >> beam.Flatten())
  _ = tally_keys | 'WriteCounts' >> WriteCounts(config.counts_path)
  return PreprocessOutputs(examples, refused, tally_keys)


# ---------------------------------------------------------------------------------------------
# The driver: validate, prepare the output folder, run, check, publish the manifest.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CsvFacts:
  """What validation learnt about the labels CSV (None where a dry run did not look)."""
  csv_format: str | None
  sha256: str | None
  lines: int | None


def _is_local(path: str) -> bool:
  return '://' not in path


def inspect_labels_csv(path: str) -> CsvFacts:
  """Checks the CSV exists and has a labels header; hashes it and counts its lines in one pass.

  Raises:
    ConfigError: the file is missing, unreadable or not a labels CSV.
  """
  if not FileSystems.exists(path):
    raise ConfigError(f'--labels_csv {path} does not exist')
  if _is_local(path) and not os.path.isfile(path):
    raise ConfigError(f'--labels_csv {path} is not a regular file')
  try:
    fmt, _ = labels.read_label_lines(path)
  except ValueError as e:
    raise ConfigError(f'--labels_csv {path}: {e}') from None
  if not labels.has_data_rows(path):
    raise ConfigError(f'--labels_csv {path} has a header but no rows: there is nothing to '
                      'prepare; point it at the labels file of your images')
  digest, lines = hashlib.sha256(), 0
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
      lines += chunk.count(b'\n')
  return CsvFacts(fmt.value, digest.hexdigest(), lines)


def check_images_dir(images_dir: str) -> None:
  """Refuses an images folder that is missing or holds no .jpg file (every row would fail)."""
  if _is_local(images_dir) and not os.path.isdir(images_dir):
    state = 'is not a folder' if os.path.lexists(images_dir) else 'does not exist'
    raise ConfigError(f'--images_dir {images_dir} {state}')
  source = ImageSource.files_in(images_dir, IMAGE_EXTENSION)
  if next(iter(list_image_files(source, (IMAGE_EXTENSION,))), None):
    return
  raise ConfigError(f'--images_dir {images_dir} holds no .jpg files (the job reads '
                    '<images_dir>/<image_name>.jpg for every CSV row)')


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
  """The job's own flags; everything else is a Beam pipeline option."""
  parser = command_line.ArgumentParser(
      prog='python -m beam_jobs.preprocess', description=__doc__.split('\n')[0],
      epilog='Any other flag is passed to Beam (e.g. --runner, --direct_num_workers).')
  parser.add_argument('--labels_csv', required=True,
                      help='train_v2.csv (image_name,tags) or the tutorial\'s '
                           'image_name,weather_labels,ground_labels CSV')
  parser.add_argument('--images_dir', required=True, help='folder of <image_name>.jpg files')
  parser.add_argument('--output_dir', required=True, help='where shards, dead letters and the '
                                                          'manifest go')
  parser.add_argument('--image_size', type=int, default=schema.DEFAULT_IMAGE_SIZE,
                      help='side of the square uint8 RGB pixels written (default %(default)s)')
  parser.add_argument('--eval_fraction', type=float, default=0.2,
                      help='share of images in eval, by a hash of the name (default %(default)s)')
  parser.add_argument('--num_shards', type=int, default=None,
                      help='TFRecord shards per split (default: ~100-200 MB a shard)')
  parser.add_argument('--compression', choices=sorted(COMPRESSIONS), default='none',
                      help='TFRecord compression (default %(default)s)')
  parser.add_argument('--max_bad_fraction', type=float, default=0.05,
                      help='fail when dead-lettered CSV rows exceed this share of rows '
                           '(default %(default)s)')
  parser.add_argument('--max_pixels', type=int, default=DEFAULT_MAX_PIXELS,
                      help='refuse images whose header declares more pixels (default %(default)s)')
  parser.add_argument('--max_file_bytes', type=int, default=DEFAULT_MAX_FILE_BYTES,
                      help='refuse image files larger than this without reading them '
                           '(default %(default)s)')
  parser.add_argument('--overwrite', action='store_true',
                      help='delete an earlier run of this job in --output_dir (only its own '
                           'files) before writing')
  args, beam_args = parser.parse_known_args(argv)
  try:
    runner_options.check_beam_flags(beam_args, command_line.own_flags(parser))
  except ValueError as e:
    parser.error(str(e))
  return args, beam_args


def validate_config(args: argparse.Namespace, check_paths: bool = True) -> tuple[PreprocessConfig,
                                                                                  CsvFacts]:
  """Turns flags into a checked `PreprocessConfig`; fails with a message that says what to do.

  Args:
    args: from `parse_args`.
    check_paths: False in a Dataflow dry run, where remote inputs are not looked at.

  Raises:
    ConfigError: a flag out of range, a missing or unreadable input.
  """
  if not 0 < args.eval_fraction < 1:
    raise ConfigError(f'--eval_fraction must be between 0 and 1 (exclusive), not '
                      f'{args.eval_fraction}: training needs both a train and an eval split')
  if not 0 <= args.max_bad_fraction <= 1:
    raise ConfigError(f'--max_bad_fraction must be between 0 and 1, not {args.max_bad_fraction}')
  if not 1 <= args.image_size <= 4096:
    raise ConfigError(f'--image_size must be between 1 and 4096, not {args.image_size}')
  if args.num_shards is not None and args.num_shards < 1:
    raise ConfigError(f'--num_shards must be at least 1, not {args.num_shards}')
  if args.max_pixels < 1:
    raise ConfigError(f'--max_pixels must be at least 1, not {args.max_pixels}')
  if args.max_file_bytes < 1:
    raise ConfigError(f'--max_file_bytes must be at least 1, not {args.max_file_bytes}')
  facts = CsvFacts(None, None, None)
  if check_paths or _is_local(args.labels_csv):
    facts = inspect_labels_csv(args.labels_csv)
  if check_paths or _is_local(args.images_dir):
    check_images_dir(args.images_dir)
  if args.num_shards is not None:
    num_shards = {split: args.num_shards for split in SPLITS}
  elif facts.lines is not None:
    fractions = {'train': 1 - args.eval_fraction, 'eval': args.eval_fraction}
    num_shards = {split: estimate_num_shards(facts.lines, args.image_size, fractions[split])
                  for split in SPLITS}
  else:
    num_shards = {split: 0 for split in SPLITS}   # unknown size: the runner decides
  config = PreprocessConfig(
      labels_csv=args.labels_csv, images_dir=args.images_dir, output_dir=args.output_dir,
      image_size=args.image_size, eval_fraction=args.eval_fraction,
      num_shards=tuple(num_shards.items()), compression=args.compression,
      max_bad_fraction=args.max_bad_fraction, max_pixels=args.max_pixels,
      max_file_bytes=args.max_file_bytes)
  return config, facts


def prepare_output_dir(config: PreprocessConfig, overwrite: bool) -> None:
  """Claims --output_dir for this run (model/output_dir.py), or refuses before touching it.

  A finished run is replaced only with --overwrite, and so are the files of a killed or failed
  one: Beam names shards -SSSSS-of-NNNNN, and a stale set of another N must never sit beside new
  ones. Anything else in the folder, or an overlap with an input, is refused.
  """
  claim_output_dir(config.output_dir, LAYOUT, overwrite,
                   inputs={'--images_dir': config.images_dir, '--labels_csv': config.labels_csv})


def read_counts(config: PreprocessConfig) -> dict[str, int]:
  with FileSystems.open(config.counts_path) as f:
    text = f.read().decode('utf-8').strip()
  return json.loads(text) if text else {}


def list_shards(config: PreprocessConfig) -> dict[str, list[str]]:
  """Shard paths per split, relative to the output folder, sorted."""
  shards = {}
  for split in SPLITS:
    pattern = config.shard_prefix(split) + '-*-of-*' + SHARD_SUFFIXES[config.compression]
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    shards[split] = [f'{split}/{FileSystems.split(path)[1]}' for path in paths]
  return shards


def build_manifest(config: PreprocessConfig, facts: CsvFacts, tally: dict[str, int],
                   shards: dict[str, list[str]], runner: str, seconds: float) -> dict:
  counts, label_counts = counts_from_tally(tally)
  return {
      'stage': STAGE,
      'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
      'inputs': {'labels_csv': config.labels_csv, 'labels_csv_sha256': facts.sha256,
                 'labels_csv_format': facts.csv_format, 'images_dir': config.images_dir},
      'options': {'image_size': config.image_size, 'eval_fraction': config.eval_fraction,
                  'num_shards': dict(config.num_shards), 'compression': config.compression,
                  'max_bad_fraction': config.max_bad_fraction, 'max_pixels': config.max_pixels,
                  'runner': runner},
      'image_size': config.image_size,
      'compression': config.compression,
      'shards': shards,
      'dead_letters': sorted(
          f'{DEAD_LETTERS_DIR}/{FileSystems.split(m.path)[1]}' for m in FileSystems.match(
              [config.dead_letters_prefix + '*.jsonl'])[0].metadata_list),
      'counts': counts,
      'label_counts': label_counts,
      'seconds': round(seconds, 1),
  }


def summary(manifest: dict, output_dir: str) -> str:
  counts = manifest['counts']
  examples = counts['examples']
  total = sum(examples.values())
  lines = [
      f'preprocess: {counts["csv_rows"]} CSV rows -> {total} examples '
      f'(train {examples["train"]}, eval {examples["eval"]}) + '
      f'{counts["dead_lettered_rows"]} dead-lettered rows, in {manifest["seconds"]} s '
      f'({total / max(manifest["seconds"], 1e-9):.1f} images/s)',
  ]
  for split in SPLITS:
    if not examples[split]:
      lines.append(f'  warning: the {split} split is empty; training needs examples in both')
  for reason, n in counts['dead_letters'].items():
    lines.append(f'  dead letters {reason}: {n}')
  if counts['rows_without_weather']:
    lines.append(f'  rows without a weather tag (kept, weather all zeros): '
                 f'{counts["rows_without_weather"]}')
  lines.append(f'  shards: train {len(manifest["shards"]["train"])}, '
               f'eval {len(manifest["shards"]["eval"])}; manifest '
               f'{manifest_lib.manifest_path(output_dir)}')
  return '\n'.join(lines)


@dataclasses.dataclass
class RunOutcome:
  """What `run` returns: the Beam result (its job, in a dry run) and the manifest (None then)."""
  pipeline_result: object
  manifest: dict | None
  counters: dict[str, int] = dataclasses.field(default_factory=dict)


def run(argv: list[str] | None = None) -> RunOutcome:
  """Parses flags, validates, runs the job, checks it and publishes the manifest.

  Raises:
    ConfigError: bad flags or inputs (before anything runs).
    dead_letters.TooManyBadInputs: more dead-lettered rows than --max_bad_fraction allows (the
      shards exist, the manifest does not).
  """
  args, beam_args = parse_args(argv)
  options = PipelineOptions(beam_args)
  dry_run = runner_options.is_dataflow_dry_run(options)
  config, facts = validate_config(args, check_paths=not dry_run)
  show_progress_logs()
  if not dry_run:
    prepare_output_dir(config, args.overwrite)

  started = time.monotonic()
  pipeline = beam.Pipeline(runner=runner_options.local_runner(options), options=options)
  build_pipeline(pipeline, config)
  result = pipeline.run()
  result.wait_until_finish()
  if not dry_run and result.state != PipelineState.DONE:
    raise RuntimeError(f'the pipeline ended in state {result.state}; nothing was published')
  if dry_run:
    print('preprocess: dry run, the job was translated and not submitted; nothing was written')
    return RunOutcome(result, None)

  seconds = time.monotonic() - started
  tally = read_counts(config)
  runner = str(options.view_as(StandardOptions).runner or 'DirectRunner')
  manifest = build_manifest(config, facts, tally, list_shards(config), runner, seconds)
  counts = manifest['counts']
  check_conservation(counts)
  dead_letters.check_bad_fraction(
      counts['dead_lettered_rows'], counts['csv_rows'], config.max_bad_fraction, 'CSV rows',
      FileSystems.join(config.output_dir, DEAD_LETTERS_DIR))
  manifest_lib.write_manifest(config.output_dir, manifest)
  print(summary(manifest, config.output_dir))
  return RunOutcome(result, manifest, query_counters(result))


def main(argv: list[str] | None = None) -> None:
  command_line.run_command(STAGE, lambda: run(argv),
                           refusals=(ConfigError, OutputRefused, dead_letters.TooManyBadInputs))


if __name__ == '__main__':
  # Through the package, not __main__: workers unpickle our DoFns and element types by module
  # name, and `__main__.LabelledImage` does not exist in a worker process.
  from beam_jobs import preprocess  # pylint: disable=import-self
  preprocess.main()
