"""What every command does alike: a quiet terminal, one-line errors, a clean Ctrl-C or SIGTERM.

Usage:
  if __name__ == '__main__':
    command_line.quiet_third_party()   # first, before TensorFlow loads
  ...
  parser = command_line.ArgumentParser(prog='python -m model.train', ...)   # has --verbose
  parser.add_argument('--job_dir', type=command_line.user_path)            # ~ expanded
  if __name__ == '__main__':
    command_line.run_command('train', main)
"""
import argparse
import errno
import gc
import os
import re
import signal
import sys
import threading
from typing import Callable

from model import third_party_logs

__all__ = ['ArgumentParser', 'INTERRUPTED_EXIT_CODE', 'TERMINATED_EXIT_CODE', 'VERBOSE_ENV',
           'VERBOSE_FLAG', 'own_flags', 'skip_teardown_collections', 'quiet_third_party',
           'run_command', 'short', 'system_error', 'user_path', 'verbose_requested']

# What a shell reports for a command ended by SIGINT (128 + 2) and by SIGTERM (128 + 15).
INTERRUPTED_EXIT_CODE = 130
TERMINATED_EXIT_CODE = 143
# Conditions of the machine, not of the program: each is reported in one line with what to do.
_FULL = 'free some space (or write to another disk), then run it again'
_ACCESS = ('check that you may read every input and write the output folder (its permissions, '
           'or a read-only mount), then run it again')
_SYSTEM_ERRORS = {
    errno.ENOSPC: _FULL, errno.EDQUOT: _FULL, errno.EFBIG: _FULL,
    errno.EACCES: _ACCESS, errno.EPERM: _ACCESS, errno.EROFS: _ACCESS,
    errno.ENOTDIR: 'a path that must be a folder, or lie in one, names a file: check the paths',
    errno.EISDIR: 'a path that must be a file names a folder: check the paths',
    errno.ENAMETOOLONG: 'a path is too long for the file system: choose a shorter one',
    errno.EIO: ('the disk or network file system failed to read or write (check it), then run '
                'it again'),
    errno.EMFILE: 'too many open files: raise the limit (ulimit -n), then run it again',
    errno.ENFILE: 'too many open files on this machine: run it again when fewer are open',
}
# How a worker's OSError reads once Beam has wrapped it in its own exception, as text.
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\] ([^\[\]\n]*?)(?:: '([^'\n]*)')?(?: \[while running|$|\n)")
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


def user_path(value: str) -> str:
  """A path flag's value with a leading `~` expanded, as a shell does for a word that starts
  with it (`--output_dir=~/out` is one word, which the shell leaves as it is). Every path flag of
  every command takes its value through this, so a path means the same in every flag: the one
  checked for overlaps is the one written. gs:// and other URLs are left as they are. An empty
  value (`--output_dir ""`, an unset shell variable) is refused: it would mean the working
  directory without saying so."""
  if not value.strip():
    raise argparse.ArgumentTypeError('is empty: give a path (an unset shell variable?)')
  return os.path.expanduser(value) if value.startswith('~') else value


def system_error(error: BaseException) -> tuple[str, str | None, str] | None:
  """(what failed, the path or None, what to do) when `error` is, or wraps, a condition of the
  machine (a full disk, a permission, a read-only mount...); None for anything else.

  Beam re-raises a worker's exception wrapped in its own, with the original as the cause (in
  this process) or only as text (from another process): both are read.
  """
  seen = set()
  cause = error
  while cause is not None and id(cause) not in seen:
    seen.add(id(cause))
    if isinstance(cause, OSError) and cause.errno in _SYSTEM_ERRORS:
      return (cause.strerror or os.strerror(cause.errno), cause.filename,
              _SYSTEM_ERRORS[cause.errno])
    cause = cause.__cause__ or cause.__context__
  text = str(error)
  found = _ERRNO_IN_TEXT.search(text)
  if found and int(found.group(1)) in _SYSTEM_ERRORS:
    return found.group(2), found.group(3), _SYSTEM_ERRORS[int(found.group(1))]
  # TensorFlow's file system reports the same conditions as its own errors (a full disk is a
  # ResourceExhaustedError), with the system's words after the path: '/a/b; No space left...'.
  for code, remedy in _SYSTEM_ERRORS.items():
    words = os.strerror(code)
    if words in text:
      path = re.search(r'(/[^\s;,\']+)[;:,]? ' + re.escape(words), text)
      return words, path.group(1) if path else None, remedy
  return None


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
  """Runs a command's `main`: a refusal or a condition of the machine is one line and exit 1,
  Ctrl-C one line and exit 130, SIGTERM (what Docker and Kubernetes send) one line and exit 143.

  Args:
    name: the command's name, the first word of each line it prints.
    main: the command; its own output and exit code stand.
    refusals: exceptions whose message says what to do (configuration, refused input): no
      traceback, it would only hide the message.
  """
  owner = os.getpid()

  def stopped(signum, *_):
    # A process forked by the command (an encoder process) inherits this handler: only the
    # command itself speaks.
    if os.getpid() == owner:
      how = 'interrupted' if signum == signal.SIGINT else 'terminated (SIGTERM)'
      sys.stderr.write(f'{name}: {how}; nothing was published (its manifest is written only '
                       'when it finishes). Run it again with --overwrite to start over.\n')
      sys.stderr.flush()
    # At once, not through KeyboardInterrupt: Beam wraps it in its own errors wherever it lands,
    # and Beam's and TensorFlow's threads would print tracebacks on the way out. Nothing is lost:
    # a stage publishes its manifest last, so an interrupted output reads as unfinished.
    os._exit(INTERRUPTED_EXIT_CODE if signum == signal.SIGINT  # pylint: disable=protected-access
             else TERMINATED_EXIT_CODE)

  handled = {}
  if threading.current_thread() is threading.main_thread():
    for signum, default in ((signal.SIGINT, signal.default_int_handler),
                            (signal.SIGTERM, signal.SIG_DFL)):
      if signal.getsignal(signum) is default:
        handled[signum] = signal.signal(signum, stopped)
  try:
    main()
  except KeyboardInterrupt:
    stopped(signal.SIGINT)
  except Exception as e:  # pylint: disable=broad-except
    condition = None if verbose_requested() else system_error(e)
    if condition is not None:
      what, path, remedy = condition
      where = f': {short(path)}' if path else ''
      print(f'{name}: error: {what}{where}. Nothing was published; {remedy} '
            '(--verbose shows where it happened)', file=sys.stderr)
      sys.exit(1)
    if not isinstance(e, refusals):
      raise
    print(f'{name}: error: {e}', file=sys.stderr)
    sys.exit(1)
  finally:
    for signum, previous in handled.items():
      signal.signal(signum, previous)


def skip_teardown_collections() -> None:
  """For a command's `__main__`, once everything is written and said: what is left is the
  interpreter's teardown, whose garbage collections go through every object of Beam (and
  TensorFlow, where loaded): a wait after the last line that grows with the objects loaded.
  Frozen, they are skipped; the exit handlers still run. Not for a `main()` called in a
  longer-lived process (a test), whose later garbage would then never be collected."""
  gc.freeze()


def own_flags(parser: argparse.ArgumentParser) -> list[str]:
  """The flags a parser defines, for suggesting the closest one to a typo."""
  return [flag for action in parser._actions  # pylint: disable=protected-access
          for flag in action.option_strings if flag.startswith('--')]
