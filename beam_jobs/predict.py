"""Bulk prediction: image folders -> predictions, submission.csv, dead letters, summary, report.

Usage:
  python -m beam_jobs.predict --input DIR_OR_GLOB [--input ...] --output_dir OUT \
      --model_dir EXPORT/PlanetModel[/N] [--labels_csv CSV] [Beam pipeline options]
  python -m beam_jobs.predict ... --serving_address HOST:PORT [--model_name PlanetModel]

The graph, in order: match files -> one path per image name -> read + decode (the one decoder,
at the model's resolution) -> RunInference (in-process SavedModel or gRPC to TF Serving) -> result
rows -> sinks. Every image is keyed by its name (the file stem) from the match to the last write,
and ends either as a prediction or as a dead letter: matched = predictions + dead letters.
"""
import collections
import concurrent.futures
import csv
import hashlib
import io
import json
import logging
import os
import time
from typing import Any, Iterable, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils.windowed_value import WindowedValue

from beam_jobs.common import dead_letters, labels, runner_options
from beam_jobs import report
from beam_jobs.common.image_decoder import DEFAULT_MAX_PIXELS, decode_image
from beam_jobs.common.image_files import (DEFAULT_MAX_FILE_BYTES, ImageSource, list_image_files,
                                   read_image_file)
from beam_jobs.common.progress import LogProgress, counter, show_progress_logs
from model import command_line, manifest, metrics, schema
from model.errors import InputRefused, Reason
from model.output_dir import (OutputLayout, check_outputs_apart, claim_output_dir,
                              with_beam_temporaries)

STAGE = 'predict'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
THUMBNAILS = 36
SUBMISSION_FILE = 'submission.csv'
# Everything this job writes under OUT: only these files are ever deleted by --overwrite.
LAYOUT = OutputLayout(STAGE, with_beam_temporaries(
    'predictions-?????-of-?????.jsonl', 'dead_letters-?????-of-?????.jsonl', SUBMISSION_FILE,
    'summary.json', 'report.html'))
# A cell starting with one of these is run as a formula by spreadsheets (OWASP's CSV injection).
FORMULA_PREFIXES = ('=', '+', '-', '@', '\t', '\r')


class ThresholdsByVersion:
  """The ground thresholds of each model version, read from the export's planet.json.

  The in-process backend runs one version; through TF Serving a new version can appear mid-job,
  and its rows must be decided with its own thresholds. Without a readable export (gRPC without
  --model_dir) every version gets `default`.
  """

  def __init__(self, default: tuple[float, ...], versions_dir: str | None = None,
               known: dict[str, tuple[float, ...]] | None = None):
    self._default = tuple(default)
    self._versions_dir = versions_dir
    self._known = dict(known or {})

  def __call__(self, version: str) -> tuple[float, ...]:
    if version not in self._known:
      self._known[version] = self._read(version)
    return self._known[version]

  def _read(self, version: str) -> tuple[float, ...]:
    if not self._versions_dir:
      return self._default
    from model.saved_model_info import ExportError, inspect_export  # pylint: disable=import-outside-toplevel
    try:
      return inspect_export(FileSystems.join(self._versions_dir, version), verify=False).ground_thresholds
    except (ExportError, OSError) as e:
      logging.warning('no thresholds for version %s (%s); using %s', version, e, self._default)
      return self._default


class JobConfig(NamedTuple):
  """Everything the graph needs, validated before the pipeline starts."""
  sources: tuple[ImageSource, ...]
  output_dir: str
  image_size: int
  thresholds: ThresholdsByVersion
  model_name: str
  backend: str                 # 'in_process' or 'grpc'
  labels_csv: str | None
  max_pixels: int
  started_at: float
  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES


# ----------------------------------------------------------------------------- pure functions


def image_source(given: str) -> ImageSource:
  """A folder means every image below it, recursively (its name taken literally when it
  exists, glob characters and all); a glob or a file is used as it is."""
  return ImageSource.of(given, IMAGE_EXTENSIONS)


def image_name(path: str) -> str:
  """The key of an image from first read to last write: its file stem."""
  return os.path.splitext(path.rstrip('/').rsplit('/', 1)[-1])[0]


def pick_path(name: str, paths: Iterable[str]) -> tuple[str, list[str]]:
  """One file per image name: the first path in sort order; the others are duplicates.

  A path listed twice (overlapping --input folders) is one file, never a duplicate of itself.
  """
  ordered = sorted(set(paths))
  return ordered[0], ordered[1:]


def result_row(name: str, path: str, inference: dict, thresholds: ThresholdsByVersion,
               model_name: str) -> dict:
  """One prediction row: probabilities by label name and the tags after its version's thresholds."""
  version = str(inference['model_version'])
  weather = np.asarray(inference[schema.OUTPUT_WEATHER], dtype=float)
  ground = np.asarray(inference[schema.OUTPUT_GROUND], dtype=float)
  decisions = metrics.decide(weather[None], ground[None], thresholds(version))[0]
  return {
      'image_name': name,
      'path': path,
      'weather': {label: float(p) for label, p in zip(schema.WEATHER_LABELS, weather)},
      'ground': {label: float(p) for label, p in zip(schema.GROUND_LABELS, ground)},
      'tags': metrics.tags_of(decisions),
      'model_name': model_name,
      'model_version': version,
  }


def row_decisions(row: dict) -> np.ndarray:
  tags = set(row['tags'])
  return np.array([label in tags for label in schema.ALL_LABELS])


def spreadsheet_safe(cell: str) -> str:
  """A cell a spreadsheet shows as text: a leading formula character gets an apostrophe.

  The rule of submission.csv only (see the README): `=cmd` is written `'=cmd`. Every other output
  (predictions-*.jsonl, summary.json, the report) keeps the name exactly.
  """
  return "'" + cell if cell.startswith(FORMULA_PREFIXES) else cell


def submission_text(rows: Iterable[dict]) -> str:
  """submission.csv: a header and one row per prediction, sorted by name, quoted as RFC 4180
  says (a name with a comma, a quote or a line break stays one field)."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\r\n')   # CRLF: then CR and LF in names are quoted
  writer.writerow(['image_name', 'tags'])
  for row in sorted(rows, key=lambda r: r['image_name']):
    writer.writerow([spreadsheet_safe(row['image_name']), ' '.join(row['tags'])])
  return buffer.getvalue()


def thumbnail_key(item) -> str:
  """A deterministic, content-independent sample of images for the report."""
  (name, _), _ = item
  return hashlib.sha256(name.encode()).hexdigest()


# ----------------------------------------------------------------------------- DoFns


def read_and_decode(name: str, path: str, image_size: int, max_pixels: int,
                    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
  """One image file -> ('decoded', ((name, path), pixels)) or ('refused', dead letter)."""
  try:
    data = read_image_file(path, max_file_bytes)
    return 'decoded', ((name, path), decode_image(data, image_size, max_pixels))
  except InputRefused as e:
    return 'refused', dead_letters.from_refusal(name, e, STAGE, path)


class ReadAndDecode(beam.DoFn):
  """(name, path) -> ((name, path), uint8 pixels), or a dead letter on the 'refused' output.

  Reads and decodes ahead, in a small thread pool: RunInference runs the model on the thread that
  calls this DoFn, so without lookahead decoding and inference take turns. Pillow and TensorFlow
  both release the GIL, so the next images decode while the model runs on the last batch.
  """
  LOOKAHEAD = 128   # images decoded ahead: 2 batches, 6 MB at 128 px

  def __init__(self, image_size: int, max_pixels: int, threads: int = 2,
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    self._size = image_size
    self._max_pixels = max_pixels
    self._max_file_bytes = max_file_bytes
    self._threads = threads
    self._pool = None
    self._pending = collections.deque()

  def setup(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(self._threads,
                                                       thread_name_prefix='decode')

  def start_bundle(self):
    self._pending = collections.deque()

  def _emit(self, windowed: bool):
    future, window, timestamp = self._pending.popleft()
    kind, value = future.result()
    # Counters on the bundle's thread: Beam keeps metrics per thread.
    counter('images_decoded' if kind == 'decoded' else 'images_refused').inc()
    if windowed:
      value = WindowedValue(value, timestamp, [window])
    return value if kind == 'decoded' else beam.pvalue.TaggedOutput('refused', value)

  def process(self, element, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
    name, path = element
    self._pending.append((self._pool.submit(read_and_decode, name, path, self._size,
                                            self._max_pixels, self._max_file_bytes),
                          window, timestamp))
    while len(self._pending) > self.LOOKAHEAD or (self._pending and self._pending[0][0].done()):
      yield self._emit(windowed=False)

  def finish_bundle(self):
    while self._pending:
      yield self._emit(windowed=True)

  def teardown(self):
    if self._pool:
      self._pool.shutdown(wait=False, cancel_futures=True)


class ToResultRow(beam.DoFn):
  """PredictionResult -> result row, or a dead letter when the backend refused the image."""

  def __init__(self, thresholds, model_name: str):
    self._thresholds = thresholds
    self._model_name = model_name

  def process(self, element):
    (name, path), result = element
    if isinstance(result.inference, InputRefused):
      yield beam.pvalue.TaggedOutput('refused', dead_letters.from_refusal(
          name, result.inference, STAGE, path))
      return
    counter('predictions').inc()
    yield result_row(name, path, result.inference, self._thresholds, self._model_name)


def failed_batch_to_dead_letters(failure) -> Iterable[dict]:
  """RunInference's own failures (a whole batch raised): one dead letter per image of the batch."""
  batch, error = failure  # error: (type, value, traceback text), as ParDo's exception handling gives
  message = error[1] if isinstance(error, tuple) and len(error) > 1 else error
  for (name, path), _ in batch:
    yield dead_letters.dead_letter(name, Reason.INFERENCE_FAILED,
                                   f'inference failed for its batch: {message}', STAGE, path)


class AttachTruth(beam.DoFn):
  """row -> (row, 17-vector of true labels or None), from the labels CSV loaded once per worker."""

  def __init__(self, labels_csv: str):
    self._labels_csv = labels_csv
    self._truth = None

  def setup(self):
    rows, _ = labels.parse_label_file(self._labels_csv)
    self._truth = {name: np.array(r.weather + r.ground, dtype=bool) for name, r in rows.items()}

  def process(self, row):
    yield row, self._truth.get(row['image_name'])


# ----------------------------------------------------------------------------- combiners


class PredictionStatsFn(beam.CombineFn):
  """Counts predicted labels and versions; with labels, the sums Kaggle's F2 and the rest need."""

  def create_accumulator(self):
    zeros = np.zeros(len(schema.ALL_LABELS), dtype=np.int64)
    return {'predictions': 0, 'predicted': zeros.copy(), 'versions': collections.Counter(),
            'labelled': 0, 'unlabelled': 0, 'f2_sum': 0.0, 'tp': zeros.copy(), 'fp': zeros.copy(),
            'fn': zeros.copy(), 'confusion': np.zeros((schema.NUM_WEATHER,) * 2, dtype=np.int64)}

  def add_input(self, acc, element):
    row, truth = element
    decided = row_decisions(row)
    acc['predictions'] += 1
    acc['predicted'] += decided
    acc['versions'][row['model_version']] += 1
    if truth is None:
      acc['unlabelled'] += 1
      return acc
    acc['labelled'] += 1
    acc['f2_sum'] += float(metrics.f2_per_image(truth[None], decided[None])[0])
    acc['tp'] += truth & decided
    acc['fp'] += ~truth & decided
    acc['fn'] += truth & ~decided
    if truth[:schema.NUM_WEATHER].any():
      acc['confusion'][truth[:schema.NUM_WEATHER].argmax(), decided[:schema.NUM_WEATHER].argmax()] += 1
    return acc

  def merge_accumulators(self, accumulators):
    merged = self.create_accumulator()
    for acc in accumulators:
      for key, value in acc.items():
        merged[key] = merged[key] + value
    return merged

  def extract_output(self, acc):
    return acc


class DeadLetterStatsFn(beam.CombineFn):
  """Counts dead letters by reason and keeps a few examples of each."""
  EXAMPLES_PER_REASON = 3

  def create_accumulator(self):
    return collections.Counter(), {}

  def add_input(self, acc, record):
    counts, examples = acc
    counts[record['reason']] += 1
    kept = examples.setdefault(record['reason'], [])
    if len(kept) < self.EXAMPLES_PER_REASON:
      kept.append(record)
    return acc

  def merge_accumulators(self, accumulators):
    counts, examples = collections.Counter(), {}
    for c, e in accumulators:
      counts.update(c)
      for reason, records in e.items():
        kept = examples.setdefault(reason, [])
        kept.extend(records[:self.EXAMPLES_PER_REASON - len(kept)])
    return counts, examples

  def extract_output(self, acc):
    counts, examples = acc
    return dict(counts), sorted((r for rs in examples.values() for r in rs),
                                key=lambda r: (r['reason'], r['image_name']))


def build_summary(_, config: JobConfig, matched: int, stats: dict, dead, thumbnails) -> dict:
  """The job's summary.json: counts, label distribution, versions, and the evaluation."""
  dead_counts, dead_examples = dead
  elapsed = time.time() - config.started_at
  predicted = {label: int(n) for label, n in zip(schema.ALL_LABELS, stats['predicted'])}
  summary = {
      'model_name': config.model_name,
      'model_versions': sorted(stats['versions']),
      'predictions_per_version': dict(sorted(stats['versions'].items())),
      'backend': config.backend,
      'image_size': config.image_size,
      'started_at': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(config.started_at)),
      'elapsed_seconds': round(elapsed, 3),
      'images_per_second': round(stats['predictions'] / elapsed, 2) if elapsed > 0 else 0.0,
      'counts': {'images_matched': matched, 'predictions': stats['predictions'],
                 'dead_letters': sum(dead_counts.values())},
      'dead_letter_reasons': dict(sorted(dead_counts.items())),
      'dead_letter_examples': dead_examples,
      'predicted_label_counts': predicted,
  }
  if config.labels_csv:
    n = stats['labelled']
    summary['evaluation'] = {
        'labels_csv': config.labels_csv,
        'labelled_images': n,
        'unlabelled_images': stats['unlabelled'],
        'f2': stats['f2_sum'] / n if n else 0.0,
        'per_label': metrics.scores_from_counts(stats['tp'], stats['fp'], stats['fn']),
        'weather_labels': list(schema.WEATHER_LABELS),
        'weather_confusion': stats['confusion'].tolist(),
    }
  return summary


def make_thumbnails(sampled, thresholds, model_name: str) -> list[dict]:
  thumbs = []
  for (name, path), result in sorted(sampled, key=lambda item: item[0]):
    row = result_row(name, path, result.inference, thresholds, model_name)
    thumbs.append({'image_name': name, 'tags': row['tags'],
                   'src': report.make_thumbnail(result.example)})
  return thumbs


# ----------------------------------------------------------------------------- the graph


def _write_one_file(pcoll, path: str, label: str, trailing_newline: bool = True):
  """Writes a PCollection holding one string as exactly `path` (no shard suffix)."""
  return pcoll | label >> beam.io.WriteToText(path, num_shards=1, shard_name_template='',
                                              append_trailing_newlines=trailing_newline)


def build_pipeline(p: beam.Pipeline, config: JobConfig, model_handler) -> None:
  """Builds the prediction graph on `p`; `model_handler` yields the shared result contract."""
  out = config.output_dir
  matched = (p
             | 'Inputs' >> beam.Create(config.sources)
             | 'ListImages' >> beam.FlatMap(list_image_files, IMAGE_EXTENSIONS)
             | 'OncePerPath' >> beam.Distinct()   # overlapping --input folders
             | 'KeyByName' >> beam.Map(lambda path: (image_name(path), path)))
  matched_count = matched | 'CountMatched' >> beam.combiners.Count.Globally()

  def one_path_per_name(element):
    name, paths = element
    kept, duplicates = pick_path(name, paths)
    yield name, kept
    for path in duplicates:
      yield beam.pvalue.TaggedOutput('duplicate', dead_letters.dead_letter(
          name, Reason.DUPLICATE_NAME, f'another file has the same image name: {kept}; '
          'only that one is predicted (rename one of them)', STAGE, path))

  unique = (matched
            | 'GroupByName' >> beam.GroupByKey()
            | 'OnePathPerName' >> beam.FlatMap(one_path_per_name).with_outputs(
                'duplicate', main='unique'))
  decoded = (unique.unique
             | 'SpreadReads' >> beam.Reshuffle()
             | 'ReadAndDecode' >> beam.ParDo(ReadAndDecode(
                 config.image_size, config.max_pixels, max_file_bytes=config.max_file_bytes))
             .with_outputs('refused', main='decoded'))
  inferred, failed = (decoded.decoded
                      | 'Progress' >> beam.ParDo(LogProgress(f'{STAGE}: images decoded'))
                      | 'RunInference' >> RunInference(KeyedModelHandler(model_handler))
                      .with_exception_handling())
  rows = inferred | 'ToResultRow' >> beam.ParDo(
      ToResultRow(config.thresholds, config.model_name)).with_outputs('refused', main='rows')

  refused = ((unique.duplicate, decoded.refused, rows.refused,
              failed.failed_inferences | 'FailedBatches' >> beam.FlatMap(failed_batch_to_dead_letters))
             | 'AllDeadLetters' >> beam.Flatten())
  _ = refused | 'WriteDeadLetters' >> dead_letters.WriteDeadLetters(
      FileSystems.join(out, 'dead_letters'))

  _ = (rows.rows
       | 'PredictionToJson' >> beam.Map(lambda row: json.dumps(row, sort_keys=True))
       | 'WritePredictions' >> beam.io.WriteToText(
           FileSystems.join(out, 'predictions'), file_name_suffix='.jsonl'))
  _ = _write_one_file(
      rows.rows
      | 'SubmissionFields' >> beam.Map(lambda row: {'image_name': row['image_name'],
                                                   'tags': row['tags']})
      | 'AllSubmissionRows' >> beam.combiners.ToList()
      | 'SubmissionText' >> beam.Map(submission_text),
      FileSystems.join(out, SUBMISSION_FILE), 'WriteSubmission', trailing_newline=False)

  if config.labels_csv:
    with_truth = rows.rows | 'AttachTruth' >> beam.ParDo(AttachTruth(config.labels_csv))
  else:
    with_truth = rows.rows | 'NoTruth' >> beam.Map(lambda row: (row, None))
  stats = with_truth | 'PredictionStats' >> beam.CombineGlobally(PredictionStatsFn())
  dead_stats = refused | 'DeadLetterStats' >> beam.CombineGlobally(DeadLetterStatsFn())
  sampled = (inferred
             | 'Predicted' >> beam.Filter(lambda item: not isinstance(item[1].inference, InputRefused))
             | 'SampleThumbnails' >> beam.combiners.Top.Of(THUMBNAILS, key=thumbnail_key, reverse=True))
  summary = (p
             | 'SummaryTrigger' >> beam.Create([None])
             | 'BuildSummary' >> beam.Map(
                 build_summary, config,
                 matched=beam.pvalue.AsSingleton(matched_count),
                 stats=beam.pvalue.AsSingleton(stats),
                 dead=beam.pvalue.AsSingleton(dead_stats),
                 thumbnails=beam.pvalue.AsSingleton(sampled)))
  _ = _write_one_file(summary | 'SummaryJson' >> beam.Map(json.dumps, indent=2, sort_keys=True),
                      FileSystems.join(out, 'summary.json'), 'WriteSummary')
  _ = _write_one_file(
      summary | 'RenderReport' >> beam.Map(
          lambda s, sample: report.render_report(
              s, make_thumbnails(sample, config.thresholds, config.model_name)),
          sample=beam.pvalue.AsSingleton(sampled)),
      FileSystems.join(out, 'report.html'), 'WriteReport')


# ----------------------------------------------------------------------------- the driver


def parse_args(argv):
  parser = command_line.ArgumentParser(
      prog='python -m beam_jobs.predict', description=__doc__.split('\n')[0],
      epilog='Any other flag is passed to Beam (e.g. --runner, --direct_num_workers).')
  parser.add_argument('--input', action='append', required=True,
                      help='a folder (every .jpg/.jpeg/.png below it), a glob or a file; repeatable')
  parser.add_argument('--output_dir', required=True)
  parser.add_argument('--model_dir',
                      help='EXPORT/PlanetModel (highest version) or one version folder; with '
                           '--serving_address, only where the thresholds are read')
  parser.add_argument('--serving_address', help='HOST:PORT of TensorFlow Serving (gRPC)')
  parser.add_argument('--model_name', default=schema.MODEL_NAME)
  parser.add_argument('--model_version', type=int, help='gRPC: a fixed version (default: latest)')
  parser.add_argument('--tls', action='store_true', help='gRPC over TLS')
  parser.add_argument('--root_cert', help='gRPC TLS: a PEM root certificate file')
  parser.add_argument('--allow_insecure', action='store_true',
                      help='gRPC without TLS to a host that is not loopback')
  parser.add_argument('--max_request_bytes', type=int, help='gRPC: the largest request sent')
  parser.add_argument('--request_timeout_secs', type=float,
                      help='gRPC: the deadline of every Predict call (default 30)')
  parser.add_argument('--retry_budget_secs', type=float,
                      help='gRPC: how long after its first transient failure a request is retried '
                           'before its images are dead-lettered UNAVAILABLE (default 30)')
  parser.add_argument('--labels_csv', help='score the predictions against these labels')
  parser.add_argument('--max_bad_fraction', type=float, default=0.05)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--max_pixels', type=int, default=DEFAULT_MAX_PIXELS)
  parser.add_argument('--max_file_bytes', type=int, default=DEFAULT_MAX_FILE_BYTES,
                      help='refuse image files larger than this without reading them '
                           '(default %(default)s)')
  parser.add_argument('--overwrite', action='store_true',
                      help='delete an earlier run of this job in OUTPUT_DIR (only its own files)')
  args, pipeline_args = parser.parse_known_args(argv)
  try:
    runner_options.check_beam_flags(pipeline_args, command_line.own_flags(parser))
  except ValueError as e:
    parser.error(str(e))
  if not args.model_dir and not args.serving_address:
    parser.error('give --model_dir (in-process) or --serving_address (TF Serving over gRPC)')
  grpc_values = (args.root_cert, args.model_version, args.max_request_bytes,
                 args.request_timeout_secs, args.retry_budget_secs)
  if (args.tls or args.allow_insecure or any(v is not None for v in grpc_values)) and not (
      args.serving_address):
    parser.error('--tls, --root_cert, --allow_insecure, --model_version, --max_request_bytes, '
                 '--request_timeout_secs and --retry_budget_secs go with --serving_address')
  if args.request_timeout_secs is not None and args.request_timeout_secs <= 0:
    parser.error('--request_timeout_secs must be positive')
  if args.retry_budget_secs is not None and args.retry_budget_secs < 0:
    parser.error('--retry_budget_secs must be 0 or more')
  if not 0 <= args.max_bad_fraction <= 1:
    parser.error('--max_bad_fraction must be between 0 and 1')
  if args.batch_size < 1:
    parser.error('--batch_size must be at least 1')
  for name in ('max_pixels', 'max_file_bytes'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be at least 1')
  return args, pipeline_args


def check_inputs(sources: Iterable[ImageSource]) -> None:
  """Fails before the pipeline starts when an --input holds no image."""
  for source in sources:
    if next(iter(list_image_files(source, IMAGE_EXTENSIONS)), None) is None:
      raise FileNotFoundError(f'--input {source.path} matches no .jpg/.jpeg/.png file; check '
                              'the path')


def check_labels_csv(path: str) -> None:
  """A wrong header or a file without rows fails here, not on a worker."""
  labels.read_label_lines(path)
  if not labels.has_data_rows(path):
    raise ValueError(f'--labels_csv {path} has a header but no rows: nothing to score against')


def make_backend(args) -> tuple[Any, int, ThresholdsByVersion, str, dict]:
  """The model handler, image size, thresholds, backend name and model facts for the manifest.

  Everything that can be wrong with the model is found here, before the pipeline starts.
  """
  from model.saved_model_info import inspect_export  # pylint: disable=import-outside-toplevel
  export = inspect_export(args.model_dir) if args.model_dir else None
  if not args.serving_address:
    from beam_jobs.inference_handler import SavedModelHandler  # pylint: disable=import-outside-toplevel
    thresholds = ThresholdsByVersion(export.ground_thresholds,
                                     known={export.version: export.ground_thresholds})
    return (SavedModelHandler(export, max_batch_size=args.batch_size), export.image_size,
            thresholds, 'in_process',
            {'model_dir': args.model_dir, 'version_dir': export.version_dir,
             'version': export.version})

  from beam_jobs import serving_handler  # pylint: disable=import-outside-toplevel
  transport = {'use_tls': args.tls, 'allow_insecure': args.allow_insecure,
               'root_certificates': (serving_handler.read_root_certificates(args.root_cert)
                                     if args.root_cert else None)}
  image_size, version = serving_handler.check_serving_model(
      args.serving_address, args.model_name, args.model_version,
      image_size=export.image_size if export else None, **transport)
  limits = {key: value for key, value in (('max_request_bytes', args.max_request_bytes),
                                          ('timeout_secs', args.request_timeout_secs),
                                          ('retry_budget_secs', args.retry_budget_secs))
            if value is not None}
  handler = serving_handler.ServingGrpcHandler(
      args.serving_address, model_name=args.model_name, model_version=args.model_version,
      image_size=image_size, max_batch_size=args.batch_size, **limits, **transport)
  if export:
    versions_dir = os.path.dirname(export.version_dir.rstrip('/'))
    thresholds = ThresholdsByVersion(export.ground_thresholds, versions_dir)
  else:
    logging.warning('no --model_dir: ground labels are decided at the default threshold %s; '
                    'give the export folder TF Serving serves to use its tuned thresholds',
                    schema.DEFAULT_GROUND_THRESHOLD)
    thresholds = ThresholdsByVersion((schema.DEFAULT_GROUND_THRESHOLD,) * schema.NUM_GROUND)
  return (handler, image_size, thresholds, 'grpc',
          {'serving_address': args.serving_address, 'version_at_start': str(version),
           'model_dir': args.model_dir})


def run(argv=None) -> dict:
  """Runs the job; returns the summary (for a Dataflow dry run, what was translated)."""
  started_at = time.time()
  args, pipeline_args = parse_args(argv)
  options = PipelineOptions(pipeline_args)
  dry_run = runner_options.is_dataflow_dry_run(options)
  sources = tuple(dict.fromkeys(image_source(i) for i in args.input))
  inputs = [('--input', s.root) for s in sources]
  inputs += [('--model_dir', args.model_dir), ('--labels_csv', args.labels_csv)]
  if not dry_run:
    check_outputs_apart({'--output_dir': args.output_dir}, inputs)
  check_inputs(sources)
  if args.labels_csv:
    check_labels_csv(args.labels_csv)
  handler, image_size, thresholds, backend, model_facts = make_backend(args)
  if not dry_run:
    claim_output_dir(args.output_dir, LAYOUT, args.overwrite, inputs=inputs)
  config = JobConfig(sources, args.output_dir, image_size, thresholds, args.model_name, backend,
                     args.labels_csv, args.max_pixels, started_at, args.max_file_bytes)
  patterns = [s.path for s in sources]
  print(f'{STAGE}: {", ".join(patterns)} -> {args.output_dir} ({backend}, '
        f'{image_size}px, model {model_facts})', flush=True)
  show_progress_logs()
  pipeline = beam.Pipeline(runner=runner_options.local_runner(options), options=options)
  build_pipeline(pipeline, config, handler)
  result = pipeline.run()
  result.wait_until_finish()
  if dry_run:
    return runner_options.dry_run_description(result)

  with FileSystems.open(FileSystems.join(args.output_dir, 'summary.json')) as f:
    summary = json.loads(f.read())
  counts = summary['counts']
  dead_letters_at = FileSystems.join(args.output_dir, 'dead_letters-*.jsonl')
  print(f'{STAGE}: {counts["images_matched"]} images matched, {counts["predictions"]} predicted, '
        f'{counts["dead_letters"]} dead letters ({summary["dead_letter_reasons"]}), '
        f'{summary["images_per_second"]} images/s'
        + (f', F2 {summary["evaluation"]["f2"]:.4f}' if 'evaluation' in summary else ''),
        flush=True)
  dead_letters.check_bad_fraction(counts['dead_letters'], counts['images_matched'],
                                  args.max_bad_fraction, 'images', dead_letters_at)
  outputs = sorted(m.path for m in FileSystems.match(
      [FileSystems.join(args.output_dir, '*')])[0].metadata_list)
  manifest.write_manifest(args.output_dir, {
      'stage': STAGE,
      'inputs': {'patterns': patterns, 'labels_csv': args.labels_csv,
                 'labels_csv_sha256': (manifest.sha256_of_file(args.labels_csv)
                                       if args.labels_csv else None)},
      'model': {**model_facts, 'name': args.model_name, 'image_size': image_size,
                'ground_thresholds': {v: list(thresholds(v)) for v in summary['model_versions']},
                'versions_seen': summary['model_versions']},
      'options': {k: v for k, v in vars(args).items() if k not in ('input', 'output_dir')},
      'counts': {**counts, 'dead_letter_reasons': summary['dead_letter_reasons']},
      'outputs': [os.path.basename(p) for p in outputs],
  })
  print(f'{STAGE}: wrote {args.output_dir}/(predictions-*.jsonl, submission.csv, '
        'dead_letters-*.jsonl, summary.json, report.html, manifest.json)', flush=True)
  return summary


def main(argv=None):
  command_line.run_command(STAGE, lambda: run(argv), refusals=(
      ValueError, FileNotFoundError, FileExistsError, dead_letters.TooManyBadInputs))


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.WARNING)
  main()
