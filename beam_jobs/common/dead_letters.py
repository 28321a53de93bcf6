"""Dead letters: every input a job cannot use, with its name, reason code, message and stage.

Both jobs write them as JSON lines through a Beam sink into one place,
OUT/dead_letters/dead_letters-SSSSS-of-NNNNN.jsonl, count them by reason, and fail the job after
the run (before publishing a manifest) when they exceed `--max_bad_fraction`.

Usage:
  _ = refused | 'WriteDeadLetters' >> WriteDeadLetters(file_path_prefix(output_dir))
  check_bad_fraction(bad, total, 0.05, 'images', dead_letters_dir)
"""
import json
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_jobs.common.metrics import DEAD_LETTERS, counter, dead_letters_of
from model import schema
from model.errors import InputRefused, Reason

__all__ = [
    'check_bad_fraction', 'dead_letter', 'DEFAULT_MAX_BAD_FRACTION', 'file_path_prefix',
    'FILE_PATTERN', 'FILE_PREFIX',
    'from_refusal', 'TooManyBadInputs', 'WriteDeadLetters'
]

FILE_PREFIX = 'dead_letters'
# The share of inputs a job may refuse before it fails unpublished (--max_bad_fraction).
DEFAULT_MAX_BAD_FRACTION = 0.05
# Relative to a job's output folder: for its output layout and for readers.
FILE_PATTERN = f'{schema.DEAD_LETTERS_DIR}/{FILE_PREFIX}-?????-of-?????.jsonl'


def file_path_prefix(output_dir: str) -> str:
  """What `WriteDeadLetters` takes: OUT/dead_letters/dead_letters (+ -SSSSS-of-NNNNN.jsonl)."""
  return FileSystems.join(output_dir, schema.DEAD_LETTERS_DIR, FILE_PREFIX)


def dead_letter(image_name: str, reason: Reason | str, message: str, stage: str,
                path: str | None = None, **extra: Any) -> dict:
  """One dead-letter record (a plain dict, so it serialises anywhere)."""
  record = {'image_name': image_name, 'reason': str(reason), 'message': message, 'stage': stage}
  if path is not None:
    record['path'] = path
  record.update(extra)
  return record


def from_refusal(image_name: str, refusal: InputRefused, stage: str, path: str | None = None,
                 **extra: Any) -> dict:
  return dead_letter(image_name, refusal.reason, refusal.message, stage, path, **extra)


def _count(record: dict) -> dict:
  counter(dead_letters_of(record['reason'])).inc()
  counter(DEAD_LETTERS).inc()
  return record


@beam.ptransform_fn
def WriteDeadLetters(records, file_path_prefix: str):  # pylint: disable=invalid-name
  """Counts dead letters by reason and writes them as JSON lines (one shard: they are few)."""
  return (records
          | 'CountByReason' >> beam.Map(_count)
          | 'ToJson' >> beam.Map(lambda r: json.dumps(r, sort_keys=True))
          | 'Write' >> beam.io.WriteToText(file_path_prefix, file_name_suffix='.jsonl',
                                           num_shards=1))


class TooManyBadInputs(RuntimeError):
  """More inputs were dead-lettered than --max_bad_fraction allows."""


def check_bad_fraction(bad: int, total: int, max_bad_fraction: float, what: str,
                       dead_letters_at: str, unpublished_at: str | None = None) -> None:
  """Fails the job when `bad / total` exceeds `max_bad_fraction`, naming counts and location
  (and where the run's unpublished summary and report are, when it has them)."""
  if total and bad / total > max_bad_fraction:
    left = (f' (its summary and report are in {unpublished_at}, not published)'
            if unpublished_at else '')
    raise TooManyBadInputs(
        f'{bad} of {total} {what} ({bad / total:.1%}) were refused, above --max_bad_fraction='
        f'{max_bad_fraction}; nothing was published{left}. The reasons are in {dead_letters_at}: '
        'fix the inputs, or raise --max_bad_fraction if they are expected.')
