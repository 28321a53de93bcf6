"""A stage's progress line with its total on a local run.

A local run shows one line per stage: done / total, percent, rate and time left. `ShowProgress`
draws it in the driver, a live bar on a terminal (rich) and a plain line every 10 s otherwise
(CI logs), and a last line when the stage ends. The elements are counted where they are
processed, by `CountProgress`, which may be in Beam's worker processes (multi_processing): each
process writes its count to a small file in a folder the driver made (`ProgressTally`), and the
driver adds them up. A stage whose elements are settled only after a first pass over all of them
(the preprocess job reads the whole CSV before its join settles a row) also counts that pass under
a phase name (`count_progress(..., phase='read')`), and the line shows it beside the count until
the stage is done, so the line moves from the start. Beam's own metrics would be the natural channel, but the local runners
report them only when a bundle ends, and locally a bundle is most of a stage. On Dataflow there
is no such folder: the counters in its UI are the progress.

Usage:
  tally = ProgressTally.create()
  ... | 'Progress' >> beam.ParDo(CountProgress(tally.folder))     # in build_pipeline
  with ShowProgress('predict', total=500, unit='images', tally=tally):
    pipeline.run().wait_until_finish()
  # predict: 120/500 images (24%), 35.2/s, 0:00:11 left
  # preprocess: 0/1,000,000 CSV rows (0%), -/s, -:--:-- left, 400,000 read   (a phase, while it runs)
"""
import collections
import logging
import os
import pathlib
import sys
import tempfile
import threading
import time
from typing import TextIO

import apache_beam as beam

# Re-exported for the serving backends, which import them from here; new code: metrics.py.
from beam_jobs.common.metrics import METRICS_NAMESPACE, counter, query_counters

__all__ = ['counter', 'count_progress', 'CountProgress', 'METRICS_NAMESPACE', 'progress_line',
           'ProgressCounter', 'ProgressTally', 'query_counters', 'ShowProgress', 'show_progress_logs',
           'tally_folder_exists', 'TALLY_FOLDER_PREFIX']

# The temporary folder where each process writes its running count (one small file each).
TALLY_FOLDER_PREFIX = 'planet-progress-'

_PART_SUFFIX = '.part'
# A phase's count file is <phase>~<process id>; the elements' own is <process id>.
_PHASE_SEPARATOR = '~'
_WRITE_EVERY_SECONDS = 0.5
# The rate is measured over the last half minute: start-up does not drag it down for long.
_RATE_WINDOW_SECONDS = 30.0


def show_progress_logs() -> None:
  """Sends the project's INFO lines to stderr in this process (Beam's own stay at their level)."""
  logger = logging.getLogger('planet')
  if not logger.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class ProgressTally:
  """A folder on this machine where each process of a local run writes how many elements it
  has counted (a file named by its process id), for the driver to add up.

  The folder is made by `create` in the system's temporary folder, never on a user's path.
  """

  def __init__(self, folder: str):
    self.folder = folder

  @classmethod
  def create(cls) -> 'ProgressTally':
    return cls(tempfile.mkdtemp(prefix=TALLY_FOLDER_PREFIX))

  def done(self) -> int:
    """Elements counted so far, by every process."""
    return self.counts().get('', 0)

  def counts(self) -> dict[str, int]:
    """Counts so far by phase, '' for the elements themselves (see `count_progress`)."""
    totals: dict[str, int] = {}
    for path in pathlib.Path(self.folder).iterdir():
      if path.suffix == _PART_SUFFIX:
        continue   # being written; its last complete version is still there
      phase = path.name.rpartition(_PHASE_SEPARATOR)[0]
      try:
        totals[phase] = totals.get(phase, 0) + int(path.read_text() or 0)
      except (OSError, ValueError):
        pass       # replaced while we read it: counted on the next look
    return totals

  def remove(self) -> None:
    """Deletes the files the processes wrote, then the folder (nothing else is ever in it)."""
    for path in pathlib.Path(self.folder).iterdir():
      path.unlink(missing_ok=True)
    os.rmdir(self.folder)


def count_progress(tally_folder: str, added: int, write_now: bool = False,
                   phase: str = '') -> None:
  """Adds `added` elements to this process's count in a `ProgressTally` folder.

  For a DoFn that settles many elements at once (the preprocess job's fused encoder); one that
  passes elements through uses `CountProgress`. The count is per process (shared by its threads)
  and per folder, so two pipelines in one process never add up. It is written at most every half
  second, and whenever `write_now` (at the end of a bundle).

  Args:
    tally_folder: the `ProgressTally` folder.
    added: elements to add.
    write_now: write the count now (the end of a bundle).
    phase: '' for the elements settled (the line's done / total); a word such as 'read' for a
      first pass over them, which the line shows beside the count until the stage is done.
  """
  now = time.monotonic()
  key = (tally_folder, phase)
  with CountProgress._lock:
    done = CountProgress._done[key] = CountProgress._done.get(key, 0) + added
    if not write_now and now - CountProgress._written.get(key, 0.0) < _WRITE_EVERY_SECONDS:
      return
    CountProgress._written[key] = now
    # Written whole, then renamed: the driver never reads half a number.
    name = f'{phase}{_PHASE_SEPARATOR}{os.getpid()}' if phase else str(os.getpid())
    part = pathlib.Path(tally_folder, f'{name}{_PART_SUFFIX}')
    part.write_text(str(done))
    os.replace(part, part.with_suffix(''))


def tally_folder_exists(tally_folder: str | None) -> bool:
  """Whether this worker can count into the folder (a local run; never a Dataflow worker)."""
  return bool(tally_folder) and os.path.isdir(tally_folder)


class ProgressCounter:
  """One DoFn's counts into a `ProgressTally` folder (`count_progress`). Where the folder is not
  on this worker (None, or a Dataflow worker) every call is a no-op: looked for once, on the
  first count on the worker, not where the DoFn is built."""

  def __init__(self, tally_folder: str | None):
    self._folder = tally_folder
    self._active = None

  def _counts(self) -> bool:
    if self._active is None:
      self._active = tally_folder_exists(self._folder)
    return self._active

  def add(self, added: int, phase: str = '') -> None:
    if self._counts():
      count_progress(self._folder, added, phase=phase)

  def write_now(self, added: int = 0, phase: str = '') -> None:
    """Adds `added` and writes the count now (the end of a bundle)."""
    if self._counts():
      count_progress(self._folder, added, write_now=True, phase=phase)


class CountProgress(beam.DoFn):
  """Passes elements through, counting them into a `ProgressTally` folder (None: no counting).

  The count (`count_progress`) is written at most every half second and at the end of each
  bundle. A worker on another machine (Dataflow) has no such folder and counts nothing.
  """
  _lock = threading.Lock()
  _done: dict[tuple[str, str], int] = {}       # (folder, phase) -> count
  _written: dict[tuple[str, str], float] = {}

  def __init__(self, tally_folder: str | None):
    self._progress = ProgressCounter(tally_folder)

  def process(self, element):
    self._progress.add(1)
    yield element

  def finish_bundle(self):
    self._progress.write_now()


def _clock(seconds: float | None) -> str:
  if seconds is None:
    return '-:--:--'
  minutes, secs = divmod(int(seconds + 0.5), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{secs:02d}'


def progress_line(what: str, done: int, total: int, unit: str, rate: float | None,
                  phases: dict[str, int] | None = None) -> str:
  """One progress line: 'predict: 1,234/10,000 images (12%), 456.7/s, 0:00:19 left'.

  Args:
    what: the stage, the line's first word.
    done: elements done so far; total: all of them (0 is shown as 100%).
    unit: what the elements are ('images', 'CSV rows').
    rate: elements per second lately, None before there is one.
    phases: counts of first passes by phase ('read': 400000), shown after the time left until
      the stage is done: ', 400,000 read'. The last line (all done) ends with 'left'.
  """
  percent = 100 * done // total if total else 100
  left = (total - done) / rate if rate else None
  if done >= total:
    left = 0.0
  rate_text = f'{rate:,.1f}/s' if rate is not None else '-/s'
  line = f'{what}: {done:,}/{total:,} {unit} ({percent}%), {rate_text}, {_clock(left)} left'
  if done < total:
    line += ''.join(f', {count:,} {phase}' for phase, count in sorted((phases or {}).items()))
  return line


class _Rate:
  """Elements per second over the last `_RATE_WINDOW_SECONDS`."""

  def __init__(self, started: float):
    self._samples = collections.deque([(started, 0)])

  def add(self, now: float, done: int) -> float | None:
    self._samples.append((now, done))
    while len(self._samples) > 2 and now - self._samples[1][0] >= _RATE_WINDOW_SECONDS:
      self._samples.popleft()
    then, done_then = self._samples[0]
    if done == 0 or now <= then:
      return None
    return (done - done_then) / (now - then)


class ShowProgress:
  """Shows a stage's progress while its block runs, from a `ProgressTally` (None: shows nothing).

  On a terminal, a live bar (rich); otherwise a plain `progress_line` every `every_seconds` and a
  last one when the block ends, so a log always says how far the stage got and how fast.
  """

  def __init__(self, what: str, total: int | None, unit: str, tally: ProgressTally | None,
               stream: TextIO | None = None, every_seconds: float = 10.0,
               poll_seconds: float = 0.5):
    self._what, self._total, self._unit, self._tally = what, total or 0, unit, tally
    self._stream = stream
    self._every = every_seconds
    self._poll = poll_seconds
    self._stop = threading.Event()
    self._thread = None
    self._bar = None

  def __enter__(self) -> 'ShowProgress':
    if self._tally is None:
      return self
    self._stream = self._stream or sys.stderr
    if self._stream.isatty():
      self._bar = _TerminalBar(self._what, self._total, self._unit, self._stream)
    self._thread = threading.Thread(target=self._watch, name='progress', daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._tally.remove()

  def _watch(self) -> None:
    started = time.monotonic()
    rate = _Rate(started)
    last_line, last_done = started, None
    while True:
      stopping = self._stop.wait(self._poll)
      now = time.monotonic()
      phases = self._tally.counts()
      done = phases.pop('', 0)
      if self._bar:
        self._bar.update(done, stopping, phases)
      else:
        speed = rate.add(now, done)
        # The last line only when it says something new: not twice 'all done'.
        if now - last_line >= self._every or (stopping and done != last_done):
          last_line, last_done = now, done
          print(progress_line(self._what, done, self._total, self._unit, speed, phases),
                file=self._stream, flush=True)
      if stopping:
        return


class _TerminalBar:
  """rich's live progress bar, with the same facts as `progress_line`."""

  def __init__(self, what: str, total: int, unit: str, stream: TextIO):
    # Imported here: only a driver on a terminal draws a bar.
    from rich import console, progress  # pylint: disable=import-outside-toplevel
    self._progress = progress.Progress(
        progress.TextColumn(f'{what}:'), progress.BarColumn(),
        progress.MofNCompleteColumn(), progress.TextColumn(unit),
        progress.TaskProgressColumn(), progress.TextColumn('{task.fields[rate]}'),
        progress.TimeRemainingColumn(), progress.TextColumn('left{task.fields[phases]}'),
        console=console.Console(file=stream), redirect_stdout=False, redirect_stderr=False)
    self._task = self._progress.add_task(what, total=total, rate='-/s', phases='')
    self._total = total
    self._progress.start()

  def update(self, done: int, finished: bool, phases: dict[str, int] | None = None) -> None:
    speed = self._progress.tasks[0].speed
    shown = ''.join(f', {count:,} {phase}' for phase, count in sorted((phases or {}).items())
                    if done < self._total)
    self._progress.update(self._task, completed=done,
                          rate=f'{speed:,.1f}/s' if speed else '-/s', phases=shown)
    if finished:
      self._progress.stop()
