"""What every command does alike: a quiet terminal, one-line configuration errors, a clean Ctrl-C.

Usage:
  if __name__ == '__main__':
    command_line.quiet_third_party()   # first, before TensorFlow loads
  ...
  parser = command_line.ArgumentParser(prog='python -m model.train', ...)   # has --verbose
  if __name__ == '__main__':
    command_line.run_command('train', main)
"""
import argparse
import gc
import os
import signal
import sys
import threading
from typing import Callable

from model import third_party_logs

__all__ = ['ArgumentParser', 'INTERRUPTED_EXIT_CODE', 'VERBOSE_ENV', 'VERBOSE_FLAG', 'own_flags',
           'skip_teardown_collections',
           'quiet_third_party', 'run_command', 'short', 'verbose_requested']

# What a shell reports for a command ended by SIGINT (128 + 2).
INTERRUPTED_EXIT_CODE = 130
_MAX_QUOTED_CHARS = 300
VERBOSE_FLAG = '--verbose'
# For run_local.sh and other scripts: set once, every command they start shows everything.
VERBOSE_ENV = 'PLANET_VERBOSE'


def verbose_requested(argv: list[str] | None = None) -> bool:
  """`--verbose` among a command's arguments (default: sys.argv), or PLANET_VERBOSE=1."""
  argv = sys.argv[1:] if argv is None else argv
  return VERBOSE_FLAG in argv or os.environ.get(VERBOSE_ENV, '') not in ('', '0')


def quiet_third_party(argv: list[str] | None = None) -> bool:
  """Hides TensorFlow's, absl's, CUDA's and Beam's chatter unless --verbose; returns verbose.

  The first thing a command does, before TensorFlow loads: its C++ libraries log as they load.
  The arguments are scanned before they are parsed for that reason. Real warnings and errors
  still show (model/third_party_logs.py says what is hidden and how). Only commands call it:
  tests and library users keep their own stderr.
  """
  verbose = verbose_requested(argv)
  if not verbose:
    third_party_logs.hide_third_party_logs()
  return verbose


def short(text: object, limit: int = _MAX_QUOTED_CHARS) -> str:
  """User input quoted in a message: at most `limit` characters, on one line."""
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one line (`prog: error: ...`), without the usage block above it.

  Abbreviations are off: `--max_bad` must not silently mean `--max_bad_fraction`, and a prefix
  of one of our flags must not swallow a Beam flag. Every command has `--verbose`, which
  `quiet_third_party` has already acted on by the time the flags are parsed.
  """

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('allow_abbrev', False)
    super().__init__(*args, **kwargs)
    self.add_argument(VERBOSE_FLAG, action='store_true',
                      help='also show what TensorFlow, absl, CUDA and Beam log (hidden by default; '
                           f'{VERBOSE_ENV}=1 does the same)')

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {short(message)}\n')


def run_command(name: str, main: Callable[[], object],
                refusals: tuple[type[BaseException], ...] = ()) -> None:
  """Runs a command's `main`: a refusal is one line and exit 1, Ctrl-C one line and exit 130.

  Args:
    name: the command's name, the first word of each line it prints.
    main: the command; its own output and exit code stand.
    refusals: exceptions whose message says what to do (configuration, refused input): no
      traceback, it would only hide the message.
  """
  def interrupted(*_):
    sys.stderr.write(f'{name}: interrupted; nothing was published (its manifest is written only '
                     'when it finishes). Run it again with --overwrite to start over.\n')
    sys.stderr.flush()
    # At once, not through KeyboardInterrupt: Beam wraps it in its own errors wherever it lands,
    # and Beam's and TensorFlow's threads would print tracebacks on the way out. Nothing is lost:
    # a stage publishes its manifest last, so an interrupted output reads as unfinished.
    os._exit(INTERRUPTED_EXIT_CODE)  # pylint: disable=protected-access

  handled = (threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
  previous = signal.signal(signal.SIGINT, interrupted) if handled else None
  try:
    main()
  except KeyboardInterrupt:
    interrupted()
  except refusals as e:
    print(f'{name}: error: {e}', file=sys.stderr)
    sys.exit(1)
  finally:
    if handled:
      signal.signal(signal.SIGINT, previous)


def skip_teardown_collections() -> None:
  """For a command's `__main__`, once everything is written and said: what is left is the
  interpreter's teardown, whose garbage collections go through every object of Beam (and
  TensorFlow, where loaded), ~450,000 of them: 1.3 s after the last line on 2 cores. Frozen,
  they are skipped; the exit handlers still run. Not for a `main()` called in a longer-lived
  process (a test), whose later garbage would then never be collected."""
  gc.freeze()


def own_flags(parser: argparse.ArgumentParser) -> list[str]:
  """The flags a parser defines, for suggesting the closest one to a typo."""
  return [flag for action in parser._actions  # pylint: disable=protected-access
          for flag in action.option_strings if flag.startswith('--')]
