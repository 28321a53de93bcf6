"""The preprocess job's Beam graph: thin DoFns over the rules, composite transforms, the builder."""
import json
from typing import Iterator, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_jobs.common import dead_letters, labels
from beam_jobs.common.image_files import (DEFAULT_MAX_FILE_BYTES, ImageSource, list_image_files,
                                          read_image_file)
from beam_jobs.common.progress import CountProgress, counter
from beam_jobs.common.tfrecord_sink import WriteSplit
from beam_jobs.preprocess.config import IMAGE_EXTENSION, PreprocessConfig
from beam_jobs.preprocess.rules import (CSV_ROWS, DEAD_LETTERED_ROWS, DEAD_LETTERS, EncodedExample,
                                        LabelledImage,
                                        assign_split, counter_name, image_to_example,
                                        join_rows_with_image, raw_image_name, row_dead_letter,
                                        tally_dead_letter, tally_example, tally_key)
from model import schema
from model.errors import InputRefused

__all__ = ['EncodeExample', 'JoinRowsWithImages', 'ListImages', 'PreprocessOutputs',
           'ReadLabelRows', 'ReadLabels', 'ResolveAndJoinOneName', 'WriteCounts',
           'build_pipeline', 'count_tally_key']


class ReadLabelRows(beam.DoFn):
  """Labels CSV path -> parsed rows keyed by name; refused lines to 'refused' (+ their names).

  The whole file is read by one worker, in file order, because line numbers decide the
  duplicate rule. Parsing is microseconds a line, and the GroupByKey by name that follows
  spreads the work, so no Reshuffle is needed here.
  """
  REFUSED = 'refused'
  REFUSED_NAMES = 'refused_names'

  def process(self, path: str) -> Iterator:
    fmt, lines = labels.read_label_lines(path)
    for line, raw in lines:
      try:
        row = labels.parse_label_line(raw, fmt)
      except InputRefused as refusal:
        name = raw_image_name(raw)
        yield beam.pvalue.TaggedOutput(self.REFUSED, row_dead_letter(
            name or f'line:{line}', refusal.reason, refusal.message, 'parse_labels', line, path))
        if name:
          yield beam.pvalue.TaggedOutput(self.REFUSED_NAMES, (name, line))
        continue
      yield row.image_name, (line, row)


class ResolveAndJoinOneName(beam.DoFn):
  """(name, {'rows', 'refused', 'files'}) -> LabelledImage; dead letters to 'refused'."""
  REFUSED = 'refused'

  def __init__(self, images_dir: str):
    self._images_dir = images_dir

  def process(self, element) -> Iterator:
    name, grouped = element
    image, refused = join_rows_with_image(
        name, grouped['rows'], grouped['refused'], grouped['files'],
        FileSystems.join(self._images_dir, name + IMAGE_EXTENSION))
    for record in refused:
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
    self._bytes_read = counter('image_bytes_read')

  def _refuse(self, image: LabelledImage, refusal: InputRefused):
    return beam.pvalue.TaggedOutput(self.REFUSED, row_dead_letter(
        image.image_name, refusal.reason, refusal.message, 'decode_image', image.line, image.path))

  def process(self, image: LabelledImage) -> Iterator:
    try:
      data = read_image_file(image.path, self._max_file_bytes)
    except InputRefused as refusal:   # not a regular file, too large, gone, unreadable
      yield self._refuse(image, refusal)
      return
    self._bytes_read.inc(len(data))
    try:
      serialized = image_to_example(image.row, data, self._image_size, self._max_pixels)
    except InputRefused as refusal:
      yield self._refuse(image, refusal)
      return
    yield EncodedExample(assign_split(image.image_name, self._eval_fraction), image.row,
                         serialized)


def count_tally_key(key: str) -> str:
  """Adds one to the Beam counter of a tally key, and passes the key on."""
  # dead_letters/<REASON> is already counted, under the same name, by WriteDeadLetters.
  if not key.startswith(tally_key(DEAD_LETTERS, '')):
    counter(counter_name(key)).inc()
  return key


def _count_image_listed(element):
  counter('images_listed').inc()
  return element


def _name_and_path(path: str) -> tuple[str, str]:
  file_name = FileSystems.split(path)[1]
  return file_name[:-len(IMAGE_EXTENSION)], path


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
          | 'ResolveAndJoin' >> beam.ParDo(ResolveAndJoinOneName(images_dir)).with_outputs(
              ResolveAndJoinOneName.REFUSED, main='images'))


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


class PreprocessOutputs(NamedTuple):
  """The PCollections a test may assert on."""
  examples: beam.PCollection       # EncodedExample
  dead_letters: beam.PCollection   # dict records
  tally_keys: beam.PCollection     # str


def _split_index(example: EncodedExample, num_partitions: int) -> int:
  del num_partitions
  return schema.SPLITS.index(example.split)


def build_pipeline(p: beam.Pipeline, config: PreprocessConfig,
                   progress_folder: str | None = None) -> PreprocessOutputs:
  """Builds the whole job on `p` (a Pipeline, or a TestPipeline in tests).

  Args:
    p: the pipeline.
    config: the validated configuration.
    progress_folder: a `ProgressTally` folder to count settled CSV rows into (a local run).
  """
  parsed = p | 'ReadLabels' >> ReadLabels(config.labels_csv)
  rows = parsed.rows
  files = p | 'ListImages' >> ListImages(config.images_dir)

  joined = ({'rows': rows, 'refused': parsed[ReadLabelRows.REFUSED_NAMES], 'files': files}
            | 'JoinRowsWithImages' >> JoinRowsWithImages(config.images_dir))

  encoded = (joined.images
             | 'EncodeExamples' >> beam.ParDo(EncodeExample(
                 config.image_size, config.eval_fraction, config.max_pixels,
                 config.max_file_bytes)).with_outputs(
                     EncodeExample.REFUSED, main='examples'))
  examples = encoded.examples

  by_split = examples | 'SplitTrainEval' >> beam.Partition(_split_index, len(schema.SPLITS))
  shards = dict(config.num_shards)
  for split, split_examples in zip(schema.SPLITS, by_split):
    name = split.capitalize()
    _ = (split_examples
         | f'Serialize{name}' >> beam.Map(lambda example: example.serialized)
         | f'Write{name}' >> WriteSplit(
             config.shard_prefix(split), shards[split], config.compression))

  refused = ((parsed[ReadLabelRows.REFUSED], joined[ResolveAndJoinOneName.REFUSED],
              encoded[EncodeExample.REFUSED])
             | 'AllDeadLetters' >> beam.Flatten())
  _ = refused | 'WriteDeadLetters' >> dead_letters.WriteDeadLetters(config.dead_letters_prefix)

  # A CSV row is settled once it is an Example or a dead letter: the progress total is the rows.
  # Counted on each branch, not after a Flatten: the local runner runs a Flatten of several
  # stages' outputs only once they all end, and the count would jump from 0 to the total.
  _ = examples | 'ProgressExamples' >> beam.ParDo(CountProgress(progress_folder))
  _ = (refused
       | 'DeadLetteredRows' >> beam.Filter(
           lambda record: DEAD_LETTERED_ROWS in tally_dead_letter(record))
       | 'ProgressDeadLetteredRows' >> beam.ParDo(CountProgress(progress_folder)))

  tally_keys = ((rows | 'TallyRows' >> beam.Map(lambda _: CSV_ROWS),
                 parsed[ReadLabelRows.REFUSED] | 'TallyRefusedRows' >> beam.Map(
                     lambda _: CSV_ROWS),
                 refused | 'TallyDeadLetters' >> beam.FlatMap(tally_dead_letter),
                 examples | 'TallyExamples' >> beam.FlatMap(tally_example))
                | 'AllTallyKeys' >> beam.Flatten()
                | 'CountTallyKeys' >> beam.Map(count_tally_key))
  _ = tally_keys | 'WriteCounts' >> WriteCounts(config.counts_path)
  return PreprocessOutputs(examples, refused, tally_keys)
