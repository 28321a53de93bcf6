"""Server-side batching for the local server: concurrent Predict calls merged into one model call.

TF Serving's `--enable_batching` (its `BasicBatchScheduler`), for the cases the project meets:
requests for the same model version, signature and input shapes (all but the first dimension)
join one queue; a queue's open batch takes requests until the next would pass `max_batch_size`
rows, and a batch is run once it is full or `batch_timeout_micros` after its first request
arrived (at once with the default 0, so batches grow only while every batch thread is busy);
`num_batch_threads` threads run batches; a request that would need a new batch while
`max_enqueued_batches` are already waiting is answered UNAVAILABLE with TF Serving's message, and
one larger than `max_batch_size` rows INVALID_ARGUMENT (TF Serving's
`enable_large_batch_splitting`, `allowed_batch_sizes` and padding are not implemented).

Usage:
  scheduler = BatchScheduler(BatchingParameters(max_batch_size=128), stats)
  outputs = scheduler.run(key, run_model, {'images': uint8 [n, H, W, 3]}, wait_secs=30)
  scheduler.close()
"""
import concurrent.futures
import dataclasses
import os
import re
import threading
import time
from typing import Callable, Hashable

import grpc
import numpy as np

from model.serving.refusal import Refusal

__all__ = ['BatchScheduler', 'BatchingParameters', 'QUEUE_FULL_MESSAGE', 'batch_key',
           'parse_batching_parameters']

# TF Serving's words (shared_batch_scheduler.h), so a client's logs read the same with either server.
QUEUE_FULL_MESSAGE = 'The batch scheduling queue to which this task was submitted is full'
# How long a batch thread sleeps at most before looking again (a bound, not a poll rate: it is
# woken whenever a request arrives or the scheduler closes).
_IDLE_WAIT_SECS = 1.0


def _schedulable_cpus() -> int:
  """TF's port::MaxParallelism(): the CPUs this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:   # not on Linux
    return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
  """TF Serving's BatchingParameters that the local server honours, with TF Serving's defaults.

  Attributes:
    max_batch_size: the most rows (images) one model call takes.
    batch_timeout_micros: how long a batch that is not full waits for more requests.
    num_batch_threads: batches run at the same time.
    max_enqueued_batches: batches that may wait for a thread before requests are refused.
  """
  max_batch_size: int = 1000
  batch_timeout_micros: int = 0
  num_batch_threads: int = dataclasses.field(default_factory=_schedulable_cpus)
  max_enqueued_batches: int = 10

  def __post_init__(self):
    for name in ('max_batch_size', 'num_batch_threads', 'max_enqueued_batches'):
      if getattr(self, name) < 1:
        raise ValueError(f'batching: {name} must be at least 1, got {getattr(self, name)}')
    if self.batch_timeout_micros < 0:
      raise ValueError(f'batching: batch_timeout_micros must be 0 or more, got '
                       f'{self.batch_timeout_micros}')


_FIELD = re.compile(r'\s*(\w+)\s*\{\s*value\s*:\s*(-?\d+)\s*\}\s*')


def parse_batching_parameters(text: str) -> BatchingParameters:
  """TF Serving's `--batching_parameters_file` text (`max_batch_size { value: 128 }` per line).

  Fields not given keep TF Serving's defaults.

  Raises:
    ValueError: a line that is not `NAME { value: N }`, or a field the local server does not
      implement (naming those it does).
  """
  known = {field.name for field in dataclasses.fields(BatchingParameters)}
  text = re.sub(r'#[^\n]*', '', text)
  values, position = {}, 0
  while position < len(text.rstrip()):
    found = _FIELD.match(text, position)
    if not found:
      line = text[position:].strip().splitlines()[0]
      raise ValueError(f'batching parameters: cannot read {line!r}; expected lines like '
                       "'max_batch_size { value: 128 }'")
    name, value = found.group(1), int(found.group(2))
    if name not in known:
      raise ValueError(f'batching parameters: {name} is not implemented by the local server '
                       f'(it takes {", ".join(sorted(known))})')
    values[name] = value
    position = found.end()
  return BatchingParameters(**values)


def batch_key(version: int, signature: str, inputs: dict[str, np.ndarray]) -> Hashable:
  """Requests that may share a model call: same version, signature, dtypes and row shapes."""
  return (version, signature,
          tuple((alias, array.dtype.str, array.shape[1:]) for alias, array in sorted(inputs.items())))


@dataclasses.dataclass
class _Task:
  inputs: dict[str, np.ndarray]
  rows: int
  answer: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


@dataclasses.dataclass
class _Batch:
  key: Hashable
  run_model: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
  due_at: float                      # monotonic: when it runs even if not full
  tasks: list[_Task] = dataclasses.field(default_factory=list)
  rows: int = 0
  full: bool = False


class BatchScheduler:
  """Queues of batches, one per `batch_key`, and the threads that run them.

  Args:
    parameters: TF Serving's four batching parameters.
    on_model_call: called with (rows, requests) after every model call, for the server's stats.
  """

  def __init__(self, parameters: BatchingParameters,
               on_model_call: Callable[[int, int], None] | None = None):
    self.parameters = parameters
    self._on_model_call = on_model_call
    self._lock = threading.Condition()
    self._queues: dict[Hashable, list[_Batch]] = {}
    self._closed = False
    self._threads = [threading.Thread(target=self._work, name=f'batch-{i}', daemon=True)
                     for i in range(parameters.num_batch_threads)]
    for thread in self._threads:
      thread.start()

  def run(self, key: Hashable, run_model: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
          inputs: dict[str, np.ndarray], wait_secs: float) -> dict[str, np.ndarray]:
    """This request's rows of the outputs of the model call its batch gets.

    Args:
      key: `batch_key(...)` of the request: only requests with the same key are merged.
      run_model: arrays -> output arrays, all with the rows in the first dimension.
      inputs: the request's arrays, all with the same first dimension.
      wait_secs: how long to wait for the answer (the caller's deadline).

    Raises:
      Refusal: UNAVAILABLE when the queue is full or the scheduler closed, INVALID_ARGUMENT for a
        request larger than max_batch_size, DEADLINE_EXCEEDED past `wait_secs`.
      Exception: what `run_model` raised for the batch.
    """
    sizes = {array.shape[0] if array.ndim else None for array in inputs.values()}
    if len(sizes) != 1 or None in sizes:
      raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                    'Batching Run() input tensors must have equal 0th-dimension size')
    rows = sizes.pop()
    if rows > self.parameters.max_batch_size:
      raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                    f'Task size {rows} is larger than maximum input batch size '
                    f'{self.parameters.max_batch_size}')
    task = _Task(inputs, rows)
    with self._lock:
      if self._closed:
        raise Refusal(grpc.StatusCode.UNAVAILABLE, 'the server is stopping')
      queue = self._queues.setdefault(key, [])
      batch = queue[-1] if queue and not queue[-1].full else None
      if batch is not None and batch.rows + rows > self.parameters.max_batch_size:
        batch.full = True
        batch = None
      if batch is None:
        if len(queue) >= self.parameters.max_enqueued_batches:
          raise Refusal(grpc.StatusCode.UNAVAILABLE, QUEUE_FULL_MESSAGE)
        batch = _Batch(key, run_model,
                       time.monotonic() + self.parameters.batch_timeout_micros / 1e6)
        queue.append(batch)
      batch.tasks.append(task)
      batch.rows += rows
      batch.full = batch.rows >= self.parameters.max_batch_size
      self._lock.notify()
    try:
      return task.answer.result(timeout=wait_secs)
    except concurrent.futures.TimeoutError:
      raise Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, 'Deadline Exceeded') from None

  def enqueued_batches(self, key: Hashable) -> int:
    """Batches of `key`'s queue not yet taken by a thread (the open one included)."""
    with self._lock:
      return len(self._queues.get(key, ()))

  def _take(self) -> _Batch | None:
    """The batch that has waited longest among those due (full or timed out), under the lock."""
    now = time.monotonic()
    ready = [queue[0] for queue in self._queues.values()
             if queue and (queue[0].full or queue[0].due_at <= now)]
    if not ready:
      return None
    batch = min(ready, key=lambda b: b.due_at)
    self._queues[batch.key].pop(0)
    return batch

  def _next_due_in(self) -> float:
    """Seconds until the first open batch is due (bounded), under the lock."""
    now = time.monotonic()
    due = [queue[0].due_at - now for queue in self._queues.values() if queue]
    return max(0.0, min(due + [_IDLE_WAIT_SECS]))

  def _work(self) -> None:
    while True:
      with self._lock:
        batch = self._take()
        while batch is None:
          if self._closed:
            return
          self._lock.wait(self._next_due_in())
          batch = self._take()
      self._run_batch(batch)

  def _run_batch(self, batch: _Batch) -> None:
    tasks = batch.tasks
    try:
      merged = {alias: (tasks[0].inputs[alias] if len(tasks) == 1 else
                        np.concatenate([task.inputs[alias] for task in tasks]))
                for alias in tasks[0].inputs}
      outputs = batch.run_model(merged)
    except BaseException as error:  # pylint: disable=broad-except
      # Every request of the batch gets the model's error, as each would have alone.
      for task in tasks:
        task.answer.set_exception(error)
      return
    finally:
      if self._on_model_call:
        self._on_model_call(batch.rows, len(tasks))
    start = 0
    for task in tasks:
      task.answer.set_result({name: array[start:start + task.rows]
                              for name, array in outputs.items()})
      start += task.rows

  def close(self, wait_secs: float = 10.0) -> None:
    """Runs what is queued, then stops the threads (waiting at most `wait_secs` for them)."""
    with self._lock:
      self._closed = True
      for queue in self._queues.values():
        for batch in queue:
          batch.full = True
      self._lock.notify_all()
    deadline = time.monotonic() + wait_secs
    for thread in self._threads:
      thread.join(max(0.0, deadline - time.monotonic()))
