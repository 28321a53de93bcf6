"""Checks a preprocess output before anyone trains on it: every shard against its manifest.

Usage:
  python -m model.verify_data PREP_OUT [--image_size 128] [--max_workers 4]

Reads PREP_OUT/manifest.json (a folder without one is refused: its job did not finish), then every
listed shard to its end with the training input's own check (`model.dataset.check_shard`): each
record's length and data CRCs, each record parsed at the manifest's image size, a gzip shard's
trailer. Unlike training, which stops at the first bad shard, it reports every bad one, one line
each, then compares each split's example count with the manifest's.

Exit status: 0 and a one-line summary when everything matches; 1 when the folder or any shard is
bad (each named on stderr); 2 for a usage error.
"""
from model import command_line

if __name__ == '__main__':
  # Before TensorFlow loads: its C++ libraries log as they load (model/command_line.py).
  command_line.quiet_third_party()

# pylint: disable=wrong-import-position,wrong-import-order
import concurrent.futures
import dataclasses
import sys
import time

import tensorflow as tf

from model import dataset as dataset_lib
from model import manifest as manifest_lib
# pylint: enable=wrong-import-position,wrong-import-order

__all__ = ['main', 'PROG', 'Report', 'ShardCheck', 'verify_data']

PROG = 'python -m model.verify_data'


@dataclasses.dataclass(frozen=True)
class ShardCheck:
  """What reading one shard found: its summary, or why it is bad."""
  split: str
  path: str
  summary: dataset_lib.SplitSummary | None
  problem: str | None


@dataclasses.dataclass(frozen=True)
class Report:
  """Every shard's check and every problem found, in manifest order."""
  data_dir: str
  shards: tuple[ShardCheck, ...]
  problems: tuple[str, ...]
  examples: dict[str, int]
  seconds: float

  @property
  def ok(self) -> bool:
    return not self.problems

  def summary_line(self) -> str:
    counts = ', '.join(f'{split} {n}' for split, n in self.examples.items())
    if self.ok:
      return (f'verify_data: {self.data_dir}: OK, {len(self.shards)} shards, '
              f'{sum(self.examples.values())} examples ({counts}) match manifest.json, every '
              f'record read and checked ({self.seconds:.1f} s)')
    bad = sum(1 for s in self.shards if s.problem)
    return (f'verify_data: {self.data_dir}: BAD, {bad} of {len(self.shards)} shards bad, '
            f'{len(self.problems)} problems ({self.seconds:.1f} s)')


def _check_one(split: str, path: str, data: dataset_lib.PreparedData) -> ShardCheck:
  if not tf.io.gfile.exists(path):
    return ShardCheck(split, path, None, f'shard {path} is missing (the manifest lists it)')
  try:
    return ShardCheck(split, path, dataset_lib.check_shard(path, data), None)
  except dataset_lib.CorruptShard as e:
    return ShardCheck(split, path, None, str(e))
  except tf.errors.OpError as e:   # unreadable: permissions, a vanished file, a storage error
    message = getattr(e, 'message', str(e)).split('\n')[0]
    return ShardCheck(split, path, None, f'shard {path} cannot be read ({type(e).__name__}: '
                                         f'{message})')


def verify_data(data_dir: str, image_size: int | None = None, max_workers: int = 4) -> Report:
  """Checks every shard of a preprocess output against its manifest.

  Raises:
    ManifestMissing: no manifest.json (the preprocess job did not finish).
    ValueError: a manifest that is not a usable preprocess manifest (another stage, no shards).
  """
  started = time.monotonic()
  data = dataset_lib.load_prepared(data_dir, image_size, require_shards=False)
  jobs = [(split, path) for split in dataset_lib.SPLITS for path in data.shards[split]]
  with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
    checks = tuple(pool.map(lambda job: _check_one(*job, data), jobs))
  problems = [c.problem for c in checks if c.problem]
  examples = {}
  for split in dataset_lib.SPLITS:
    parts = [c for c in checks if c.split == split]
    if any(c.problem for c in parts):
      continue   # its count is unknown; the bad shards are already reported
    examples[split] = dataset_lib.combine_summaries(c.summary for c in parts).examples
    try:
      dataset_lib.check_split_count(data, split, examples[split])
    except ValueError as e:
      problems.append(str(e))
  return Report(data_dir, checks, tuple(problems), examples, time.monotonic() - started)


def main(argv=None) -> int:
  parser = command_line.ArgumentParser(prog=PROG, description=__doc__.split('\n')[0])
  parser.add_argument('data_dir', type=command_line.user_path,
                      help='a beam_jobs.preprocess output folder (local or gs://)')
  parser.add_argument('--image_size', type=int,
                      help='also refuse data prepared at another size (default: the manifest\'s)')
  parser.add_argument('--max_workers', type=int, default=4, help='shards read at once')
  args = parser.parse_args(argv)
  if args.max_workers < 1:
    parser.error('--max_workers must be at least 1')
  try:
    report = verify_data(args.data_dir, args.image_size, args.max_workers)
  except (manifest_lib.ManifestMissing, ValueError, FileNotFoundError) as e:
    print(f'verify_data: BAD {e}', file=sys.stderr)
    return 1
  for problem in report.problems:
    print(f'verify_data: BAD {problem}', file=sys.stderr)
  print(report.summary_line(), file=sys.stdout if report.ok else sys.stderr)
  return 0 if report.ok else 1


if __name__ == '__main__':
  sys.exit(main())
