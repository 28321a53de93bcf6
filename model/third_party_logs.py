"""What TensorFlow, absl, CUDA and Beam print that tells a user nothing, and the filters hiding it.

A command's normal run shows its own lines and every real warning and error; `--verbose` (or
PLANET_VERBOSE=1, model/command_line.py) shows the rest again. The chatter comes two ways, so
there are two filters, both driven by `NOISE`:

- Python log records: Beam's and TensorFlow's loggers, and Beam's relay of its worker processes'
  logs (multi_processing). A `logging.Filter` on the loggers that make them, and TensorFlow's and
  absl's loggers at WARNING.
- Lines that C++ libraries write straight to file descriptor 2: absl and TensorFlow log as their
  libraries load, before TensorFlow reads TF_CPP_MIN_LOG_LEVEL, so no setting stops them. The
  descriptor becomes a pipe into a small process (`python -m model.third_party_logs`) that drops
  those lines and passes every other one on. A process rather than a thread, so that a command
  that dies (a fatal C++ check, a segfault, Ctrl-C's immediate exit) cannot take its last lines
  with it. Beam's worker processes inherit the descriptor, so their lines are filtered too.

Python's own `sys.stderr` keeps writing to the terminal directly: tracebacks, our messages and the
progress line never wait behind the filter, and a terminal is still seen as one.

Usage:
  hide_third_party_logs()   # first thing in a command, before TensorFlow loads
"""
import atexit
import logging
import os
import re
import signal
import subprocess
import sys

__all__ = ['NOISE', 'NoiseFilter', 'hide_third_party_logs', 'is_noise', 'main',
           'pass_lines_except_noise']

NOISE = tuple(re.compile(pattern) for pattern in (
    # absl's banner, once per C++ library that logs before TensorFlow initialises absl.
    r'^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR',
    # absl's and TensorFlow's INFO lines, in both formats ('I0000 00:00:1796075203.914258   12069
    # port.cc:153] oneDNN custom operations are on...', '2025-09-17 14:44:05.157831: I
    # external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] Could not find cuda drivers...').
    r'^I\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] ',
    r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: I \S+:\d+\] ',
    # CUDA probing on a machine without a GPU: ERROR lines in a healthy CPU run.
    r'\] failed call to cuInit',
    r'\] Unable to register cu(DNN|FFT|BLAS) factory',
    # Without AVX-512, oneDNN leaves uint8 to Eigen, as it should.
    r'\] oneDNN supports DT_UINT8 only on platforms with AVX-512',
    r'This TensorFlow binary is optimized to use available CPU instructions',
    r'^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler',
    # Beam's SDK workers on a local run: internal flags they do not know, a folder only Dataflow
    # has, and a memory probe whose import fails (Beam 2.77's ml/inference/base.py).
    r'Discarding unparseable args',
    r'No semi_persistent_directory found',
    r'Resource module is not available for current platform',
    # multiprocessing's resource tracker, cleaning up after a job that stopped at once (Ctrl-C,
    # SIGTERM, a kill): the semaphores of the preprocess job's encoder processes. It does so;
    # nothing is left, and nothing is for the user to do.
    r'resource_tracker: There appear to be \d+ leaked semaphore objects to clean up',
    r"^\s+warnings\.warn\('resource_tracker: There appear to be",
))

# Where the records above are made: a logger's filter sees only the records made on it.
_NOISY_LOGGERS = ('', 'apache_beam.runners.portability.local_job_service',
                  'apache_beam.options.pipeline_options',
                  'apache_beam.runners.worker.sdk_worker_main')
# Informational only ('INFO:tensorflow:Assets written to: ...'); their warnings still show.
_CHATTY_LOGGERS = ('tensorflow', 'absl')
# Beam logs, with its traceback, the exception of a step that fails the pipeline, then raises it
# to the command, which reports it itself (model/command_line.py: one line, or the traceback of
# an unexpected error): shown once, not twice.
_REPEATING_LOGGERS = ('apache_beam.runners.common',)
_TF_CPP_MIN_LOG_LEVEL = '2'   # TensorFlow's own C++ INFO and WARNING lines once it has loaded
_READ_BYTES = 1 << 16
_FILTER_EXIT_WAIT_SECONDS = 2.0


def is_noise(line: str) -> bool:
  """Whether a line of stderr or a log message is third-party chatter (see `NOISE`)."""
  return any(pattern.search(line) for pattern in NOISE)


class NoiseFilter(logging.Filter):
  """Drops the log records whose message is third-party chatter."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not is_noise(record.getMessage())


def pass_lines_except_noise(source: int, sink: int) -> None:
  """Copies lines from one file descriptor to another until end of file, dropping chatter."""
  pending = b''
  while chunk := os.read(source, _READ_BYTES):
    *lines, pending = (pending + chunk).split(b'\n')
    kept = b''.join(line + b'\n' for line in lines
                    if not is_noise(line.decode('utf-8', 'replace')))
    if kept:
      os.write(sink, kept)
  if pending and not is_noise(pending.decode('utf-8', 'replace')):
    os.write(sink, pending)


def _filter_native_stderr() -> None:
  terminal = os.dup(2)
  read_end, write_end = os.pipe()
  # Its own session: Ctrl-C reaches the command, and the filter lives to pass on its last words.
  process = subprocess.Popen([sys.executable, '-m', 'model.third_party_logs'], stdin=read_end,
                             stdout=subprocess.DEVNULL, stderr=terminal, start_new_session=True)
  os.close(read_end)
  os.dup2(write_end, 2)
  os.close(write_end)
  sys.stderr.flush()
  sys.stderr = os.fdopen(terminal, 'w', buffering=1, encoding=sys.stderr.encoding,
                         errors='backslashreplace')

  def finish():
    # Close our end of the pipe, so that the filter's last lines come out before the shell's next.
    sys.stderr.flush()
    os.dup2(terminal, 2)
    try:
      process.wait(_FILTER_EXIT_WAIT_SECONDS)
    except subprocess.TimeoutExpired:
      pass   # a worker process still holds the pipe; the filter ends with it
  atexit.register(finish)


def hide_third_party_logs() -> None:
  """Hides third-party chatter in this process and the processes it starts, from now on.

  Call it before TensorFlow loads. TF_CPP_MIN_LOG_LEVEL is set only where the user has not.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', _TF_CPP_MIN_LOG_LEVEL)
  for name in _NOISY_LOGGERS:
    logging.getLogger(name).addFilter(NoiseFilter())
  for name in _CHATTY_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  for name in _REPEATING_LOGGERS:
    logging.getLogger(name).setLevel(logging.CRITICAL)
  _filter_native_stderr()


def main() -> None:
  """The filter process: standard input to standard error, chatter dropped."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  pass_lines_except_noise(0, 2)


if __name__ == '__main__':
  main()
