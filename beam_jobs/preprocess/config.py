"""The preprocess job's flags and their validation, done before anything runs.

Usage:
  args, beam_args = parse_args(argv)
  config, facts = validate_config(args)     # ConfigError before anything runs
"""
import argparse
import dataclasses
import hashlib
import os

from apache_beam.io.filesystems import FileSystems

from beam_jobs.common import dead_letters, labels, runner_options
from beam_jobs.common.image_decoder import DEFAULT_MAX_PIXELS
from beam_jobs.common.image_files import DEFAULT_MAX_FILE_BYTES, ImageSource, list_image_files
from beam_jobs.common.read_limits import add_read_limit_flags, read_limit_problem
from beam_jobs.preprocess.rules import estimate_num_shards, join_buckets
from model import command_line, schema
from model.manifest import is_local_path

__all__ = ['ConfigError', 'CsvFacts', 'DEFAULT_EVAL_FRACTION',
           'DESCRIPTION', 'IMAGE_EXTENSION', 'PreprocessConfig', 'SHARD_FILE_PREFIX',
           'check_images_dir', 'images_dir_source', 'inspect_labels_csv', 'parse_args',
           'validate_config']

DESCRIPTION = ('Stage 1: labels CSV + JPEG folder -> train/eval TFRecord shards, dead letters '
               'and a manifest.')
# A row's image is <images_dir>/<image_name>.jpg, the extension in any case (.jpg, .JPG, .Jpg),
# as the predict job matches its extensions; the name itself matches exactly.
IMAGE_EXTENSION = '.jpg'
# Names inside --output_dir: <split>/part-SSSSS-of-NNNNN.tfrecord[.gz] and
# dead_letters/dead_letters-SSSSS-of-NNNNN.jsonl.
SHARD_FILE_PREFIX = 'part'
DEFAULT_EVAL_FRACTION = 0.2


class ConfigError(ValueError):
  """The job's configuration is wrong; raised before the pipeline starts."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Everything the pipeline needs, validated (see `validate_config`)."""
  labels_csv: str
  images_dir: str
  output_dir: str
  image_size: int = schema.DEFAULT_IMAGE_SIZE
  eval_fraction: float = DEFAULT_EVAL_FRACTION
  num_shards: tuple[tuple[str, int], ...] = tuple((split, 1) for split in schema.SPLITS)
  compression: str = 'none'
  max_bad_fraction: float = dead_letters.DEFAULT_MAX_BAD_FRACTION
  max_pixels: int = DEFAULT_MAX_PIXELS
  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
  join_buckets: int = 1   # rules.join_buckets of the CSV's rows
  # Encoder processes per worker (encoder_processes.py); 0: the encoder's threads.
  encoder_processes: int = 0

  def shard_prefix(self, split: str) -> str:
    return FileSystems.join(self.output_dir, split, SHARD_FILE_PREFIX)

  @property
  def dead_letters_prefix(self) -> str:
    return dead_letters.file_path_prefix(self.output_dir)

  @property
  def counts_path(self) -> str:
    return FileSystems.join(self.output_dir, schema.COUNTS_FILE)


@dataclasses.dataclass(frozen=True)
class CsvFacts:
  """What validation learnt about the labels CSV (None where a dry run did not look)."""
  csv_format: str | None
  sha256: str | None
  rows: int | None    # its data records: the job's csv_rows, and its progress total


def inspect_labels_csv(path: str) -> CsvFacts:
  """Checks the CSV exists and has a labels header; hashes it and counts its data records.

  Raises:
    ConfigError: the file is missing, unreadable or not a labels CSV.
  """
  if not FileSystems.exists(path):
    raise ConfigError(f'--labels_csv {path} does not exist')
  if is_local_path(path) and not os.path.isfile(path):
    raise ConfigError(f'--labels_csv {path} is not a regular file')
  digest = hashlib.sha256()
  try:
    fmt, records = labels.read_label_lines(path, digest)
  except ValueError as e:
    raise ConfigError(f'--labels_csv {path}: {e}') from None
  # Counted and hashed in one pass, before the pipeline: the count sizes the join and the shards
  # and is the progress total, so it cannot wait for the pipeline's own read (a worker's, which
  # parses). Counted as the job reads them (records, not lines), so the total is exact.
  rows = sum(1 for _ in records)
  if not rows:
    raise ConfigError(f'--labels_csv {path} has a header but no rows: there is nothing to '
                      'prepare; point it at the labels file of your images')
  return CsvFacts(fmt.value, digest.hexdigest(), rows)


def images_dir_source(images_dir: str) -> ImageSource:
  """Every entry directly in --images_dir, for `list_image_files(source, (IMAGE_EXTENSION,))` to
  keep those named *.jpg in any case (a glob *.jpg would miss .JPG on a local disk)."""
  return ImageSource.files_in(images_dir, '')


def check_images_dir(images_dir: str) -> None:
  """Refuses an images folder that is missing or holds no .jpg file (every row would fail)."""
  if is_local_path(images_dir) and not os.path.isdir(images_dir):
    state = 'is not a folder' if os.path.lexists(images_dir) else 'does not exist'
    raise ConfigError(f'--images_dir {images_dir} {state}')
  if next(iter(list_image_files(images_dir_source(images_dir), (IMAGE_EXTENSION,))), None):
    return
  raise ConfigError(f'--images_dir {images_dir} holds no .jpg files (the job reads '
                    '<images_dir>/<image_name>.jpg, the extension in any case, for every CSV '
                    'row)')


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
  """The job's own flags; everything else is a Beam pipeline option."""
  parser = command_line.ArgumentParser(
      prog='python -m beam_jobs.preprocess', description=DESCRIPTION,
      epilog='Any other flag is passed to Beam (e.g. --runner, --direct_num_workers).')
  parser.add_argument('--labels_csv', type=command_line.user_path, required=True,
                      help='train_v2.csv (image_name,tags) or the tutorial\'s '
                           'image_name,weather_labels,ground_labels CSV')
  parser.add_argument('--images_dir', type=command_line.user_path, required=True,
                      help='folder of <image_name>.jpg files')
  parser.add_argument('--output_dir', type=command_line.user_path, required=True,
                      help='where shards, dead letters and the manifest go')
  parser.add_argument('--image_size', type=int, default=schema.DEFAULT_IMAGE_SIZE,
                      help='side of the square uint8 RGB pixels written (default %(default)s)')
  parser.add_argument('--eval_fraction', type=float, default=DEFAULT_EVAL_FRACTION,
                      help='share of images in eval, by a hash of the name (default %(default)s)')
  parser.add_argument('--num_shards', type=int, default=None,
                      help='TFRecord shards per split (default: ~100-200 MB a shard)')
  parser.add_argument('--compression', choices=sorted(schema.COMPRESSIONS), default='none',
                      help='TFRecord compression (default %(default)s)')
  parser.add_argument('--max_bad_fraction', type=float,
                      default=dead_letters.DEFAULT_MAX_BAD_FRACTION,
                      help='fail when dead-lettered CSV rows exceed this share of rows '
                           '(default %(default)s)')
  add_read_limit_flags(parser)
  parser.add_argument('--encoder_processes', type=int, default=None,
                      help='processes that read, decode and write the images, per worker '
                           '(default: one per core on a local run in this process with local '
                           'files; 0, the encoder\'s threads, where the runner already runs a '
                           'process per core: Dataflow, the portable runner, '
                           '--direct_running_mode=multi_processing)')
  parser.add_argument('--overwrite', action='store_true',
                      help='delete an earlier run of this job in --output_dir (only its own '
                           'files) before writing')
  args, beam_args = runner_options.parse_job_args(parser, argv)
  return args, beam_args


def _check_ranges(args: argparse.Namespace) -> None:
  if not 0 < args.eval_fraction < 1:
    raise ConfigError(f'--eval_fraction must be between 0 and 1 (exclusive), not '
                      f'{args.eval_fraction}: training needs both a train and an eval split')
  if not 0 <= args.max_bad_fraction <= 1:
    raise ConfigError(f'--max_bad_fraction must be between 0 and 1, not {args.max_bad_fraction}')
  if not 1 <= args.image_size <= 4096:
    raise ConfigError(f'--image_size must be between 1 and 4096, not {args.image_size}')
  if args.num_shards is not None and args.num_shards < 1:
    raise ConfigError(f'--num_shards must be at least 1, not {args.num_shards}')
  if args.encoder_processes is not None and args.encoder_processes < 0:
    raise ConfigError(f'--encoder_processes must be 0 or more, not {args.encoder_processes}')
  if args.encoder_processes and not all(
      is_local_path(path) for path in (args.images_dir, args.output_dir)):
    raise ConfigError('--encoder_processes needs local --images_dir and --output_dir (the '
                      'processes write their parts as local files): pass 0, or leave it out')
  if read_limit_problem(args):
    raise ConfigError(read_limit_problem(args))


def _shards_per_split(args: argparse.Namespace, csv_rows: int | None) -> dict[str, int]:
  if args.num_shards is not None:
    return {split: args.num_shards for split in schema.SPLITS}
  if csv_rows is None:
    return {split: 0 for split in schema.SPLITS}   # unknown size: the runner decides
  fractions = {'train': 1 - args.eval_fraction, 'eval': args.eval_fraction}
  return {split: estimate_num_shards(csv_rows, args.image_size, fractions[split])
          for split in schema.SPLITS}


def validate_config(args: argparse.Namespace,
                    check_paths: bool = True) -> tuple[PreprocessConfig, CsvFacts]:
  """Turns flags into a checked `PreprocessConfig`; fails with a message that says what to do.

  Args:
    args: from `parse_args`.
    check_paths: False in a Dataflow dry run, where remote inputs are not looked at.

  Raises:
    ConfigError: a flag out of range, a missing or unreadable input.
  """
  _check_ranges(args)
  facts = CsvFacts(None, None, None)
  if check_paths or is_local_path(args.labels_csv):
    facts = inspect_labels_csv(args.labels_csv)
  if check_paths or is_local_path(args.images_dir):
    check_images_dir(args.images_dir)
  config = PreprocessConfig(
      labels_csv=args.labels_csv, images_dir=args.images_dir, output_dir=args.output_dir,
      image_size=args.image_size, eval_fraction=args.eval_fraction,
      num_shards=tuple(_shards_per_split(args, facts.rows).items()),
      compression=args.compression, max_bad_fraction=args.max_bad_fraction,
      max_pixels=args.max_pixels, max_file_bytes=args.max_file_bytes,
      join_buckets=join_buckets(facts.rows))
  return config, facts
