"""The prediction graph: thin DoFns around the row logic, and `build_pipeline` that wires them.

Usage:
  with TestPipeline() as p:
    build_pipeline(p, config, SavedModelHandler(inspect_export(model_dir)))
"""
import json
from typing import Iterable

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.transforms.window import GlobalWindows

from beam_jobs.common import dead_letters, labels
from beam_jobs.common.image_decoder import decode_image
from beam_jobs.common.image_files import DEFAULT_MAX_FILE_BYTES, list_image_files, read_image_file
from beam_jobs.common.lookahead import Lookahead, stop, thread_pool
from beam_jobs.common.name_forms import OtherForms
from beam_jobs.common.metrics import IMAGES_DECODED, IMAGES_REFUSED, PREDICTIONS, counter
from beam_jobs.common.progress import CountProgress, ProgressCounter
from beam_jobs.predict import report_html, thumbnails
from beam_jobs.predict.carry_over import CarryOver, add_counts
from beam_jobs.predict.completed_rows import KeepCompleted
from beam_jobs.predict.config import IMAGE_EXTENSIONS, REMOVED_FILE, JobConfig
from beam_jobs.predict.incremental import fingerprint
from beam_jobs.predict.rows import (RowBatch, ThresholdsByVersion, image_name, pick_path,
                                    result_rows, row_batch)
from beam_jobs.predict.stats import DeadLetterStatsFn, PredictionStatsFn, build_summary
from beam_jobs.predict.submission import WriteSubmission
from model import schema
from model.errors import InputRefused, Reason

__all__ = ['AttachTruth', 'CombinePerBundle', 'CountRows', 'KeyedBatchResults', 'OnePathPerName',
           'ReadAndDecode', 'SampleRows', 'ToResultRows', 'build_pipeline', 'combined',
           'failed_batch_to_dead_letters', 'keyed_image_files', 'read_and_decode',
           'write_text_file']

STAGE = schema.STAGE_PREDICT


# ----------------------------------------------------------------------------- DoFns


def read_and_decode(name: str, path: str, image_size: int, max_pixels: int,
                    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
  """One image file -> ('decoded', ((name, path, sha256), pixels)) or ('refused', dead letter).

  The sha256 is of the very bytes decoded, so a row's fingerprint always matches its prediction.
  """
  try:
    data = read_image_file(path, max_file_bytes)
    return 'decoded', ((name, path, fingerprint(data)), decode_image(data, image_size, max_pixels))
  except InputRefused as e:
    return 'refused', dead_letters.from_refusal(name, e, STAGE, path)


class ReadAndDecode(beam.DoFn):
  """(name, path) -> ((name, path, sha256), uint8 pixels), or a dead letter on 'refused'.

  Reads and decodes ahead, in a small thread pool: RunInference runs the model on the thread that
  calls this DoFn, so without lookahead decoding and inference take turns. Pillow and TensorFlow
  both release the GIL, so the next images decode while the model runs on the last batch.
  """
  LOOKAHEAD = 128   # images decoded ahead: 2 batches, 6 MB at 128 px

  def __init__(self, image_size: int, max_pixels: int, threads: int = 2,
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, lookahead: int = LOOKAHEAD):
    self._lookahead = lookahead
    self._size = image_size
    self._max_pixels = max_pixels
    self._max_file_bytes = max_file_bytes
    self._threads = threads
    self._pool = None
    self._ahead = None

  def setup(self):
    self._pool = thread_pool(self._threads, 'decode')
    # Counters on the bundle's thread (Beam keeps metrics per thread), made once.
    self._decoded, self._refused = counter(IMAGES_DECODED), counter(IMAGES_REFUSED)

  def start_bundle(self):
    self._ahead = Lookahead(self._pool, self._lookahead)

  def _output(self, decoded):
    kind, value = decoded
    if kind == 'decoded':
      self._decoded.inc()
      return value
    self._refused.inc()
    return beam.pvalue.TaggedOutput('refused', value)

  def process(self, element):
    name, path = element
    self._ahead.submit(read_and_decode, name, path, self._size, self._max_pixels,
                       self._max_file_bytes)
    for decoded in self._ahead.ready():
      yield self._output(decoded)

  def finish_bundle(self):
    # A batch job: every element is in the global window.
    for decoded in self._ahead.drain():
      output = self._output(decoded)
      if isinstance(output, beam.pvalue.TaggedOutput):
        yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
      else:
        yield GlobalWindows.windowed_value(output)

  def teardown(self):
    stop(self._pool)


class KeyedBatchResults(KeyedModelHandler):
  """A `KeyedModelHandler` whose RunInference output is one element per batch: the list of its
  (key, PredictionResult) pairs, so that the steps after RunInference run once a batch."""

  def run_inference(self, batch, model, inference_args=None):
    return [list(super().run_inference(batch, model, inference_args))]


class ToResultRows(beam.DoFn):
  """A batch's [(key, PredictionResult), ...] -> a `RowBatch` of its rows, and a dead letter
  ('refused') for each image the backend refused.

  The rows of a batch are made together (their tags decided at once, each row's line encoded
  once for every output).
  """

  def __init__(self, thresholds: ThresholdsByVersion, model_name: str):
    self._thresholds = thresholds
    self._model_name = model_name
    self._predictions = None

  def setup(self):
    self._predictions = counter(PREDICTIONS)

  def process(self, results):
    predicted = []
    for (name, path, sha256), result in results:
      if isinstance(result.inference, InputRefused):
        yield beam.pvalue.TaggedOutput('refused', dead_letters.from_refusal(
            name, result.inference, STAGE, path))
      else:
        predicted.append((name, path, sha256, result.inference))
    if predicted:
      self._predictions.inc(len(predicted))
      yield row_batch(result_rows(predicted, self._thresholds, self._model_name))


class SampleRows(beam.DoFn):
  """`RowBatch`es -> the bundle's candidates for the report's sample, one list per bundle:
  ((name, path, sha256), row) items (`thumbnails.Sample`); the sampled images are decoded again
  for their thumbnails, so no pixels are held."""

  def __init__(self):
    self._sample = None

  def start_bundle(self):
    self._sample = thumbnails.Sample()

  def process(self, batch: RowBatch):
    for row in batch.rows:
      self._sample.add(((row['image_name'], row['path'], row['sha256']), row))

  def finish_bundle(self):
    yield GlobalWindows.windowed_value(self._sample.items())


class OnePathPerName(beam.DoFn):
  """(name, paths) -> (name, the path predicted), and a DUPLICATE_NAME dead letter per other path
  ('duplicate'); the distinct paths it saw, once per bundle ('matched').

  A path listed twice (overlapping --input folders) is one file: it is predicted once and counted
  once, never a duplicate of itself.
  """

  def __init__(self):
    self._matched = 0

  def start_bundle(self):
    self._matched = 0

  def process(self, element):
    name, paths = element
    kept, duplicates = pick_path(name, paths)
    self._matched += 1 + len(duplicates)
    yield name, kept
    for path in duplicates:
      yield beam.pvalue.TaggedOutput('duplicate', dead_letters.dead_letter(
          name, Reason.DUPLICATE_NAME, f'another file has the same image name: {kept}; '
          'only that one is predicted (rename one of them)', STAGE, path))

  def finish_bundle(self):
    yield beam.pvalue.TaggedOutput('matched', GlobalWindows.windowed_value(self._matched))


def keyed_image_files(source, extensions: tuple[str, ...]):
  """An --input's image files, each keyed by its image name: (name, path)."""
  for path in list_image_files(source, extensions):
    yield image_name(path), path


class CountRows(beam.DoFn):
  """Counts the rows of each `RowBatch` into a `ProgressTally` folder (None: no counting)."""

  def __init__(self, tally_folder: str | None):
    self._progress = ProgressCounter(tally_folder)

  def process(self, batch: RowBatch):
    self._progress.add(len(batch.rows))

  def finish_bundle(self):
    self._progress.write_now()


def failed_batch_to_dead_letters(failure) -> Iterable[dict]:
  """RunInference's own failures (a whole batch raised): one dead letter per image of the batch."""
  batch, error = failure  # error: (type, value, traceback text), as ParDo's exception handling gives
  message = error[1] if isinstance(error, tuple) and len(error) > 1 else error
  for (name, path, _), _ in batch:
    yield dead_letters.dead_letter(name, Reason.INFERENCE_FAILED,
                                   f'inference failed for its batch: {message}', STAGE, path)


class AttachTruth(beam.DoFn):
  """`RowBatch` -> (its rows, the 17-vector of true labels of each, None where a name has none,
  the (name, CSV name) of each row without a label row whose name is a CSV row's name in another
  Unicode normalization form: name_forms.py), from the labels CSV loaded once per worker."""

  def __init__(self, labels_csv: str):
    self._labels_csv = labels_csv
    self._truth = None
    self._forms = None

  def setup(self):
    rows, _ = labels.parse_label_file(self._labels_csv)
    self._truth = {name: np.array(r.weather + r.ground, dtype=bool) for name, r in rows.items()}
    self._forms = OtherForms(self._truth)

  def process(self, batch: RowBatch):
    truths = [self._truth.get(row['image_name']) for row in batch.rows]
    other_forms = [(row['image_name'], partner) for row, truth in zip(batch.rows, truths)
                   if truth is None
                   and (partner := self._forms.partner(row['image_name'])) is not None]
    yield batch.rows, truths, other_forms


def _batch_text(batch: RowBatch) -> str:
  """A batch's lines of predictions-*.jsonl as one element (WriteToText adds the last newline)."""
  return '\n'.join(batch.lines)


# ----------------------------------------------------------------------------- the graph


class CombinePerBundle(beam.DoFn):
  """Elements -> one accumulator of `combine_fn` per bundle (`combined` merges them).

  For the summary's figures: their accumulators are small (counts, a few examples), so the step
  that needs the result reads them all as a side input; a CombineGlobally costs two more stages
  and six more steps on the local runner for the same result.
  """

  def __init__(self, combine_fn: beam.CombineFn):
    self._combine_fn = combine_fn
    self._accumulator = None

  def start_bundle(self):
    self._accumulator = self._combine_fn.create_accumulator()

  def process(self, element):
    self._accumulator = self._combine_fn.add_input(self._accumulator, element)

  def finish_bundle(self):
    yield GlobalWindows.windowed_value(self._accumulator)


def combined(combine_fn: beam.CombineFn, accumulators: list):
  """The output of `combine_fn` over everything its per-bundle `accumulators` took in."""
  return combine_fn.extract_output(combine_fn.merge_accumulators(accumulators))


def _build_summary(trigger, config: JobConfig, matched: list[int], stats: list, dead: list,
                   kinds: list | None = None) -> dict:
  """`build_summary` of the per-bundle figures: counts of images matched, accumulators of
  `PredictionStatsFn` and `DeadLetterStatsFn`, and {kind: count} of the carried images."""
  return build_summary(trigger, config, matched=sum(matched),
                       stats=combined(PredictionStatsFn(), stats),
                       dead=combined(DeadLetterStatsFn(), dead),
                       kinds=None if kinds is None else add_counts(kinds))


def _write_one_file(pcoll, path: str, label: str):
  """Writes a PCollection of lines as exactly `path` (no shard suffix)."""
  return pcoll | label >> beam.io.WriteToText(path, num_shards=1, shard_name_template='',
                                              append_trailing_newlines=True)


def write_text_file(text: str, path: str, mime_type: str = 'text/plain') -> None:
  """Writes one string and a newline as the whole of `path`; a retry writes the same bytes.

  For the outputs that are one element (summary.json, report.html): WriteToText's temporary
  files, grouping and finalize stages cost ~0.25 s of start-up each on the local runner, for one
  string. The local file system writes in place, GCS on close.
  """
  with FileSystems.create(path, mime_type=mime_type) as f:
    f.write((text + '\n').encode('utf-8'))


def build_pipeline(p: beam.Pipeline, config: JobConfig, model_handler,
                   progress_folder: str | None = None, spread_reads: bool = True) -> None:
  """Builds the prediction graph on `p`.

  Args:
    p: the pipeline.
    config: the validated configuration.
    model_handler: a backend's handler; it keeps the backends' result contract.
    progress_folder: a `ProgressTally` folder to count settled images into (a local run).
    spread_reads: a Reshuffle before reading, so a distributed runner rebalances the reads and
      the model; the local runner already splits its work after the grouping by name, and
      there the Reshuffle is only one more shuffle of every image (False).
  """
  matched = (p
             | 'Inputs' >> beam.Create(config.sources)
             | 'ListImages' >> beam.FlatMap(keyed_image_files, IMAGE_EXTENSIONS))
  # Grouped by name once: a path listed twice (overlapping --input folders) is in one group, so
  # the same grouping finds duplicates and counts the distinct paths.
  unique = (matched
            | 'GroupByName' >> beam.GroupByKey()
            | 'OnePathPerName' >> beam.ParDo(OnePathPerName()).with_outputs(
                'duplicate', 'matched', main='unique'))
  to_predict, reused = unique.unique, None
  if config.carry:   # earlier rows to reuse: only the images they do not cover are predicted
    carry = unique.unique | 'CarryOver' >> CarryOver(config)
    to_predict, reused = carry['to_predict'], carry['reused']   # reused: RowBatches
  if spread_reads:
    to_predict = to_predict | 'SpreadReads' >> beam.Reshuffle()
  decoded = (to_predict
             | 'ReadAndDecode' >> beam.ParDo(ReadAndDecode(
                 config.image_size, config.max_pixels, max_file_bytes=config.max_file_bytes,
                 # Two of the backend's batches: one decodes while the other is predicted.
                 lookahead=2 * model_handler.batch_elements_kwargs().get(
                     'max_batch_size', ReadAndDecode.LOOKAHEAD // 2)))
             .with_outputs('refused', main='decoded'))
  inferred, failed = (decoded.decoded
                      | 'RunInference' >> RunInference(KeyedBatchResults(model_handler))
                      .with_exception_handling())
  # From here on, rows travel in batches (RowBatch): every output takes the batch.
  rows = inferred | 'ToResultRow' >> beam.ParDo(
      ToResultRows(config.thresholds, config.model_name)).with_outputs('refused', main='batches')
  # Only the rows inferred in this run are kept for --resume: the reused ones are kept already.
  _ = rows.batches | 'KeepCompleted' >> beam.ParDo(KeepCompleted(config.output_dir))
  all_batches = (rows.batches if reused is None
                 else (rows.batches, reused) | 'AllRows' >> beam.Flatten())

  refused = ((unique.duplicate, decoded.refused, rows.refused,
              failed.failed_inferences | 'FailedBatches' >> beam.FlatMap(failed_batch_to_dead_letters))
             | 'AllDeadLetters' >> beam.Flatten())
  _ = refused | 'WriteDeadLetters' >> dead_letters.WriteDeadLetters(config.dead_letters_prefix)
  # An image is settled once it is a prediction or a dead letter: the progress total is matched.
  # Counted on each branch, not after a Flatten: the local runner runs a Flatten of several
  # stages' outputs only once they all end, and the count would jump from 0 to the total.
  _ = rows.batches | 'ProgressPredicted' >> beam.ParDo(CountRows(progress_folder))
  if reused is not None:
    _ = reused | 'ProgressCarried' >> beam.ParDo(CountRows(progress_folder))
  _ = refused | 'ProgressDeadLettered' >> beam.ParDo(CountProgress(progress_folder))

  _ = (all_batches
       | 'PredictionLines' >> beam.Map(_batch_text)
       | 'WritePredictions' >> beam.io.WriteToText(
           config.output_path(schema.PREDICTIONS_PREFIX), file_name_suffix='.jsonl'))
  _ = all_batches | 'WriteSubmission' >> WriteSubmission(
      config.unpublished_path(schema.SUBMISSION_FILE))

  if config.labels_csv:
    with_truth = all_batches | 'AttachTruth' >> beam.ParDo(AttachTruth(config.labels_csv))
  else:
    with_truth = all_batches | 'NoTruth' >> beam.Map(lambda batch: (batch.rows, None, ()))
  stats = with_truth | 'PredictionStats' >> beam.ParDo(CombinePerBundle(PredictionStatsFn()))
  dead_stats = refused | 'DeadLetterStats' >> beam.ParDo(CombinePerBundle(DeadLetterStatsFn()))
  carry_kinds = {'kinds': beam.pvalue.AsList(carry['kinds'])} if config.carry else {}
  # Every figure comes one per bundle (images matched, stats, dead letters, carried kinds) and is
  # added up here.
  summary = (p
             | 'SummaryTrigger' >> beam.Create([None])
             | 'BuildSummary' >> beam.Map(
                 _build_summary, config,
                 matched=beam.pvalue.AsList(unique.matched),
                 stats=beam.pvalue.AsList(stats),
                 dead=beam.pvalue.AsList(dead_stats), **carry_kinds))
  _ = (summary
       | 'SummaryJson' >> beam.Map(json.dumps, indent=2, sort_keys=True)
       | 'WriteSummary' >> beam.Map(write_text_file, config.unpublished_path(schema.SUMMARY_FILE),
                                     'application/json'))

  if config.carry and config.carry.previous_output:
    _ = _write_one_file(carry['removed'] | 'RemovedToJson' >> beam.Map(json.dumps, sort_keys=True),
                        config.unpublished_path(REMOVED_FILE), 'WriteRemoved')

  # The report's sample is drawn from every row (reused ones too); only its images are decoded.
  sampled = all_batches | 'SampleThumbnails' >> beam.ParDo(SampleRows())
  _ = (summary
       | 'RenderReport' >> beam.Map(
           lambda s, candidates: report_html.render_report(s, thumbnails.make_thumbnails(
               thumbnails.draw_sample(candidates), config.image_size, config.max_pixels,
               config.max_file_bytes)),
           candidates=beam.pvalue.AsList(sampled))
       | 'WriteReport' >> beam.Map(write_text_file, config.unpublished_path(schema.REPORT_FILE), 'text/html'))
