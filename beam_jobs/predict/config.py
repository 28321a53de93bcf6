"""The prediction job's configuration: flags, output layout, input checks and the model backend.

Everything here runs before the pipeline starts, so a wrong flag, input or model fails at once
with a message that says what to do, and no worker ever sees it.
"""
import logging
import os
from typing import Any, Iterable, NamedTuple

from apache_beam.io.filesystems import FileSystems

from beam_jobs.common import dead_letters, labels, runner_options
from beam_jobs.common.image_files import DEFAULT_MAX_FILE_BYTES, ImageSource, list_image_files
from beam_jobs.common.read_limits import add_read_limit_flags, read_limit_problem
from beam_jobs.predict import completed_rows
from beam_jobs.predict.backends import DEFAULT_MAX_BATCH_SIZE
from beam_jobs.predict.rows import ThresholdsByVersion
from model import command_line, schema
from model.manifest import is_local_path
from model.output_dir import OutputLayout, with_beam_temporaries

__all__ = ['DESCRIPTION', 'IMAGE_EXTENSIONS', 'LAYOUT', 'PREDICTION_FILES', 'PUBLISHED_LAST',
           'REMOVED_FILE', 'UNPUBLISHED_DIR',
           'Backend', 'JobConfig', 'check_inputs', 'check_labels_csv', 'image_source',
           'make_backend', 'parse_args']

DESCRIPTION = ('Bulk prediction: image folders -> predictions, submission.csv, dead letters, '
               'summary, report.')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
PREDICTION_FILES = f'{schema.PREDICTIONS_PREFIX}-?????-of-?????.jsonl'
REMOVED_FILE = 'removed.jsonl'   # with --previous_output: its images gone from the inputs
# The files a person opens appear only with the manifest: the pipeline writes them into
# UNPUBLISHED_DIR and the job moves them up once the run has passed its checks, just before the
# manifest. A failed or killed run leaves them there, under a name that says what they are.
UNPUBLISHED_DIR = 'unpublished'
PUBLISHED_LAST = (schema.SUBMISSION_FILE, schema.SUMMARY_FILE, schema.REPORT_FILE, REMOVED_FILE)
# Everything this job writes under OUT: only these files are ever deleted by --overwrite;
# --resume keeps the rows an unfinished run completed.
LAYOUT = OutputLayout(schema.STAGE_PREDICT, with_beam_temporaries(
    PREDICTION_FILES,
    dead_letters.FILE_PATTERN,
    *PUBLISHED_LAST, *(f'{UNPUBLISHED_DIR}/{name}' for name in PUBLISHED_LAST),
    *completed_rows.LAYOUT_PATTERNS), kept_on_resume=(completed_rows.FILE_PATTERN,))


class JobConfig(NamedTuple):
  """Everything the graph needs, validated before the pipeline starts."""
  sources: tuple[ImageSource, ...]
  output_dir: str
  image_size: int
  thresholds: ThresholdsByVersion
  model_name: str
  backend: str                 # 'in_process', 'grpc' or 'rest'
  labels_csv: str | None
  max_pixels: int
  started_at: float
  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
  carry: Any = None            # an incremental.CarryPlan: earlier rows to reuse, or None

  def output_path(self, *relative: str) -> str:
    """A path under --output_dir."""
    return FileSystems.join(self.output_dir, *relative)

  def unpublished_path(self, name: str) -> str:
    """Where the pipeline writes `name` (one of PUBLISHED_LAST) until the job publishes it."""
    return self.output_path(UNPUBLISHED_DIR, name)

  @property
  def dead_letters_dir(self) -> str:
    return self.output_path(schema.DEAD_LETTERS_DIR)

  @property
  def dead_letters_prefix(self) -> str:
    """Where the dead-letter sink writes: DEAD_LETTERS_DIR/dead_letters-SSSSS-of-NNNNN.jsonl."""
    return dead_letters.file_path_prefix(self.output_dir)


class Backend(NamedTuple):
  """The model backend `make_backend` checked: what the graph runs and what the manifest says."""
  handler: Any                 # a Beam ModelHandler that keeps the backends' result contract
  image_size: int              # pixels of the model's input, the decoder's output size
  thresholds: ThresholdsByVersion
  name: str                    # 'in_process', 'grpc' or 'rest'
  model_facts: dict            # for the manifest's `model`

  @property
  def version(self) -> str:
    """The model version that answers when the job starts: the export's or the server's."""
    return str(self.model_facts.get('version') or self.model_facts['version_at_start'])


def image_source(given: str) -> ImageSource:
  """A folder means every image below it, recursively (its name taken literally when it
  exists, glob characters and all); a glob or a file is used as it is."""
  return ImageSource.of(given, IMAGE_EXTENSIONS)


def parse_args(argv) -> tuple[Any, list[str]]:
  """The job's own flags, checked together; returns (flags, Beam's flags)."""
  parser = command_line.ArgumentParser(
      prog='python -m beam_jobs.predict', description=DESCRIPTION,
      epilog='Any other flag is passed to Beam (e.g. --runner, --direct_num_workers).')
  parser.add_argument('--input', type=command_line.user_path, action='append', required=True,
                      help='a folder (every .jpg/.jpeg/.png below it), a glob or a file; repeatable')
  parser.add_argument('--output_dir', type=command_line.user_path, required=True)
  parser.add_argument('--model_dir', type=command_line.user_path,
                      help='EXPORT/PlanetModel (highest version) or one version folder; with '
                           '--serving_address, only where the thresholds are read')
  parser.add_argument('--serving_address',
                      help='HOST:PORT of TensorFlow Serving: its gRPC port, or its REST port with '
                           '--serving_protocol rest')
  parser.add_argument('--serving_protocol', choices=('grpc', 'rest'), default='grpc',
                      help="TF Serving's API to use: gRPC (default) or REST (its JSON API)")
  parser.add_argument('--model_name', default=schema.MODEL_NAME)
  parser.add_argument('--tta', action='store_true',
                      help=f'test-time augmentation: the export\'s {schema.TTA_SIGNATURE} '
                           'signature, the mean over 8 flips/rotations of each chip (about 8x '
                           'the compute)')
  parser.add_argument('--label_rule', choices=schema.LABEL_RULES,
                      default=schema.DEFAULT_LABEL_RULE,
                      help='cloudy_no_ground: a chip predicted cloudy gets no ground tags; '
                           'none: ground tags by threshold alone (default %(default)s)')
  parser.add_argument('--model_version', type=int,
                      help='serving: a fixed version (default: latest)')
  parser.add_argument('--model_version_label',
                      help="serving: the version this label of TF Serving's --model_config_file "
                           'names (version_labels), followed if it moves; each row names the '
                           'version that answered')
  parser.add_argument('--tls', action='store_true',
                      help='serving over TLS (gRPC, or HTTPS for REST)')
  parser.add_argument('--root_cert', type=command_line.user_path,
                      help='serving TLS: a PEM root certificate file')
  parser.add_argument('--allow_insecure', action='store_true',
                      help='serving without TLS to a host that is not loopback')
  parser.add_argument('--max_request_bytes', type=int,
                      help='serving: the largest request sent (REST: its JSON body)')
  parser.add_argument('--request_timeout_secs', type=float,
                      help='serving: the deadline of every Predict call (default 30)')
  parser.add_argument('--retry_budget_secs', type=float,
                      help='serving: how long after its first transient failure a request is '
                           'retried before its images are dead-lettered UNAVAILABLE (default 30)')
  parser.add_argument('--labels_csv', type=command_line.user_path,
                      help='score the predictions against these labels')
  parser.add_argument('--max_bad_fraction', type=float,
                      default=dead_letters.DEFAULT_MAX_BAD_FRACTION)
  parser.add_argument('--batch_size', type=int,
                      help=f'images per RunInference batch (default {DEFAULT_MAX_BATCH_SIZE} '
                           'in-process; serving: 16 requests of 32 images, streamed)')
  add_read_limit_flags(parser)
  parser.add_argument('--overwrite', action='store_true',
                      help='delete an earlier run of this job in OUTPUT_DIR (only its own files)')
  parser.add_argument('--previous_output', type=command_line.user_path,
                      help='a finished prediction output: its rows for unchanged images (same '
                           'name and bytes) made by the same model (its fingerprint) and '
                           'thresholds are carried over, not predicted again')
  parser.add_argument('--resume', action='store_true',
                      help='continue an unfinished (killed or failed) run of this same job in '
                           'OUTPUT_DIR: the images it completed are not predicted again')
  args, pipeline_args = runner_options.parse_job_args(parser, argv)
  if args.resume and args.overwrite:
    parser.error('--resume continues an unfinished run and --overwrite deletes it: give one')
  if not args.model_dir and not args.serving_address:
    parser.error('give --model_dir (in-process) or --serving_address (TF Serving)')
  grpc_values = (args.root_cert, args.model_version, args.model_version_label,
                 args.max_request_bytes, args.request_timeout_secs, args.retry_budget_secs)
  if (args.tls or args.allow_insecure or args.serving_protocol != 'grpc' or
      any(v is not None for v in grpc_values)) and not args.serving_address:
    parser.error('--serving_protocol, --tls, --root_cert, --allow_insecure, --model_version, '
                 '--model_version_label, --max_request_bytes, --request_timeout_secs and '
                 '--retry_budget_secs go with --serving_address')
  if args.model_version is not None and args.model_version_label is not None:
    parser.error('--model_version and --model_version_label both name a version: give one')
  if args.model_version_label is not None and not args.model_version_label.strip():
    parser.error('--model_version_label is empty')
  if args.request_timeout_secs is not None and args.request_timeout_secs <= 0:
    parser.error('--request_timeout_secs must be positive')
  if args.retry_budget_secs is not None and args.retry_budget_secs < 0:
    parser.error('--retry_budget_secs must be 0 or more')
  if not 0 <= args.max_bad_fraction <= 1:
    parser.error('--max_bad_fraction must be between 0 and 1')
  if args.batch_size is not None and args.batch_size < 1:
    parser.error('--batch_size must be at least 1')
  if read_limit_problem(args):
    parser.error(read_limit_problem(args))
  return args, pipeline_args


def check_inputs(sources: Iterable[ImageSource]) -> None:
  """Fails before the pipeline starts when an --input holds no image."""
  for source in sources:
    if next(iter(list_image_files(source, IMAGE_EXTENSIONS)), None) is None:
      raise FileNotFoundError(f'--input {source.path} matches no .jpg/.jpeg/.png file; check '
                              'the path')


def check_labels_csv(path: str) -> None:
  """A missing file, one that is not a regular file (a FIFO would block the read forever), a
  wrong header (ValueError from `has_data_rows`) or a file without rows fails here, not on a
  worker."""
  if not FileSystems.exists(path):
    raise FileNotFoundError(f'--labels_csv {path} does not exist')
  if is_local_path(path) and not os.path.isfile(path):
    raise ValueError(f'--labels_csv {path} is not a regular file')
  if not labels.has_data_rows(path):
    raise ValueError(f'--labels_csv {path} has a header but no rows: nothing to score against')


def make_backend(args) -> Backend:
  """The checked backend: in-process (--model_dir) or TF Serving (--serving_address, gRPC or REST).

  Everything that can be wrong with the model is found here, before the pipeline starts.

  Raises:
    ExportError: the export is incomplete, tampered or has the wrong signature (a ValueError).
    ValueError: no server answers, or it serves another model, version or input.
  """
  # TensorFlow and gRPC are imported only once the flags are known to be right.
  from model.saved_model_info import inspect_export  # pylint: disable=import-outside-toplevel
  signature = schema.TTA_SIGNATURE if args.tta else schema.SERVING_SIGNATURE
  decision = {'label_rule': args.label_rule, 'signature': signature}
  if not args.serving_address:
    export = inspect_export(args.model_dir, signature=signature)
    from beam_jobs.predict.backends.in_process import SavedModelHandler  # pylint: disable=import-outside-toplevel
    thresholds = ThresholdsByVersion(export.ground_thresholds,
                                     known={export.version: export.ground_thresholds},
                                     fingerprints={export.version: export.fingerprint}, **decision)
    handler = SavedModelHandler(export, max_batch_size=args.batch_size or DEFAULT_MAX_BATCH_SIZE,
                                signature=signature)
    return Backend(handler, export.image_size, thresholds, 'in_process',
                   {'model_dir': args.model_dir, 'version_dir': export.version_dir,
                    'version': export.version, 'fingerprint': export.fingerprint, **decision})

  export = inspect_export(args.model_dir) if args.model_dir else None

  # pylint: disable-next=import-outside-toplevel
  from beam_jobs.predict.backends.transport import read_root_certificates
  if args.serving_protocol == 'rest':
    # pylint: disable-next=import-outside-toplevel
    from beam_jobs.predict.backends import tf_serving_rest as protocol
    handler_class = protocol.ServingRestHandler
  else:
    # pylint: disable-next=import-outside-toplevel
    from beam_jobs.predict.backends import tf_serving as protocol
    handler_class = protocol.ServingGrpcHandler
  transport = {'use_tls': args.tls, 'allow_insecure': args.allow_insecure,
               'root_certificates': (read_root_certificates(args.root_cert)
                                     if args.root_cert else None)}
  image_size, version = protocol.check_serving_model(
      args.serving_address, args.model_name, args.model_version, signature,
      image_size=export.image_size if export else None,
      model_version_label=args.model_version_label, **transport)
  limits = {key: value for key, value in (('max_request_bytes', args.max_request_bytes),
                                          ('timeout_secs', args.request_timeout_secs),
                                          ('retry_budget_secs', args.retry_budget_secs))
            if value is not None}
  handler = handler_class(
      args.serving_address, model_name=args.model_name, model_version=args.model_version,
      model_version_label=args.model_version_label, signature=signature, image_size=image_size,
      max_batch_size=args.batch_size, **limits, **transport)
  if export:
    versions_dir = FileSystems.split(export.version_dir.rstrip('/'))[0]
    thresholds = ThresholdsByVersion(export.ground_thresholds, versions_dir, **decision)
  else:
    logging.warning('no --model_dir: ground labels are decided at the default threshold %s; '
                    'give the export folder TF Serving serves to use its tuned thresholds',
                    schema.DEFAULT_GROUND_THRESHOLD)
    thresholds = ThresholdsByVersion((schema.DEFAULT_GROUND_THRESHOLD,) * schema.NUM_GROUND,
                                     **decision)
  return Backend(handler, image_size, thresholds, args.serving_protocol,
                 {'serving_address': args.serving_address, 'version_at_start': str(version),
                  'model_dir': args.model_dir, **decision})
