"""What every command does alike: one-line configuration errors, and a clean Ctrl-C.

Usage:
  parser = command_line.ArgumentParser(prog='python -m model.train', ...)
  if __name__ == '__main__':
    command_line.run_command('train', main)
"""
import argparse
import os
import signal
import sys
import threading
from typing import Callable

__all__ = ['ArgumentParser', 'INTERRUPTED_EXIT_CODE', 'own_flags', 'run_command', 'short']

# What a shell reports for a command ended by SIGINT (128 + 2).
INTERRUPTED_EXIT_CODE = 130
_MAX_QUOTED_CHARS = 300


def short(text: object, limit: int = _MAX_QUOTED_CHARS) -> str:
  """User input quoted in a message: at most `limit` characters, on one line."""
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one line (`prog: error: ...`), without the usage block above it.

  Abbreviations are off: `--max_bad` must not silently mean `--max_bad_fraction`, and a prefix
  of one of our flags must not swallow a Beam flag.
  """

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('allow_abbrev', False)
    super().__init__(*args, **kwargs)

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


def own_flags(parser: argparse.ArgumentParser) -> list[str]:
  """The flags a parser defines, for suggesting the closest one to a typo."""
  return [flag for action in parser._actions  # pylint: disable=protected-access
          for flag in action.option_strings if flag.startswith('--')]
