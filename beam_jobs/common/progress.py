"""Beam counters under one namespace, and progress lines a person watching a local run can read."""
import logging
import threading
import time
import uuid

import apache_beam as beam
from apache_beam.metrics import Metrics

__all__ = ['counter', 'LogProgress', 'METRICS_NAMESPACE', 'query_counters', 'show_progress_logs']

METRICS_NAMESPACE = 'planet'
_log = logging.getLogger('planet.progress')


def show_progress_logs() -> None:
  """Sends the project's INFO lines to stderr in this process (Beam's own stay at their level)."""
  logger = logging.getLogger('planet')
  if not logger.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def counter(name: str):
  """A Beam counter in the project's namespace (cheap to call: Beam caches the cell)."""
  return Metrics.counter(METRICS_NAMESPACE, name)


class LogProgress(beam.DoFn):
  """Passes elements through and logs '<what>: N done, R/s' at most every `every_seconds`.

  The tally is per worker process (class-level, shared by its threads), which is what a person
  watching DirectRunner wants; on Dataflow the counters in the UI are the real progress.
  """
  _lock = threading.Lock()
  _done: dict[str, int] = {}
  _started: dict[str, float] = {}
  _last_log: dict[str, float] = {}

  def __init__(self, what: str, every_seconds: float = 10.0):
    self._what = what
    self._every = every_seconds
    # One tally per pipeline built, so two jobs in one process (tests) never add up.
    self._key = f'{what}#{uuid.uuid4().hex}'

  def setup(self):
    # Worker processes (multi_processing, Dataflow) start without our handler.
    show_progress_logs()

  def process(self, element):
    now = time.monotonic()
    cls = LogProgress
    key = self._key
    with cls._lock:
      done = cls._done[key] = cls._done.get(key, 0) + 1
      started = cls._started.setdefault(key, now)
      if now - cls._last_log.get(key, started) >= self._every:
        cls._last_log[key] = now
        _log.info('%s: %d done, %.1f/s', self._what, done, done / max(now - started, 1e-9))
    yield element


def query_counters(result) -> dict[str, int]:
  """All the project's counters of a finished pipeline, by name (committed values)."""
  metrics = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(METRICS_NAMESPACE))
  totals: dict[str, int] = {}
  for item in metrics['counters']:
    totals[item.key.metric.name] = totals.get(item.key.metric.name, 0) + item.committed
  return totals
