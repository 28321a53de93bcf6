"""The bounds on what one input may cost to read, as flags both jobs share: one definition.

--max_pixels (the decoder refuses an image whose header declares more) and --max_file_bytes (a
file larger than this is refused without being read): the same names, defaults, help and checks
in preprocess and predict.

Usage:
  add_read_limit_flags(parser)
  problem = read_limit_problem(args)    # None, or the one-line message of a flag out of range
"""
import argparse

from beam_jobs.common.image_decoder import DEFAULT_MAX_PIXELS
from beam_jobs.common.image_files import DEFAULT_MAX_FILE_BYTES

__all__ = ['add_read_limit_flags', 'read_limit_problem']


def add_read_limit_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--max_pixels', type=int, default=DEFAULT_MAX_PIXELS,
                      help='refuse images whose header declares more pixels (default %(default)s)')
  parser.add_argument('--max_file_bytes', type=int, default=DEFAULT_MAX_FILE_BYTES,
                      help='refuse image files larger than this without reading them '
                           '(default %(default)s)')


def read_limit_problem(args: argparse.Namespace) -> str | None:
  for name in ('max_pixels', 'max_file_bytes'):
    if getattr(args, name) < 1:
      return f'--{name} must be at least 1, not {getattr(args, name)}'
  return None
