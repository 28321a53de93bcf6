"""Work read, hashed or decoded ahead of a DoFn on a pool, its results taken back in order.

A DoFn whose elements wait on files and decoders (reads, sha256 and Pillow release the GIL)
hands each element's work to a pool and goes on with the next, so that the work of the next
elements overlaps the step after it (RunInference runs the model on the thread that calls the
DoFn before it; the encoder writes each Example on its own thread). Results come back in the
order submitted, at most `window` of them in flight, so a bundle's memory stays bounded.

Usage:
  def setup(self):        self._pool = thread_pool(2, 'decode')
  def start_bundle(self): self._ahead = Lookahead(self._pool, window=128)
  def process(self, element):
    self._ahead.submit(read_and_decode, element)
    yield from self._ahead.ready()     # the results already done, or beyond the window
  def finish_bundle(self):
    for result in self._ahead.drain(): yield GlobalWindows.windowed_value(result)
  def teardown(self):     stop(self._pool)
"""
import collections
import concurrent.futures
from typing import Callable, Iterator

__all__ = ['Lookahead', 'stop', 'thread_pool']


def thread_pool(threads: int, name: str) -> concurrent.futures.ThreadPoolExecutor:
  """A DoFn's pool, made in its `setup()`; threads named `name` in a stack dump."""
  return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=name)


def stop(pool: concurrent.futures.Executor | None) -> None:
  """Ends a pool from `teardown()`, best effort: work not started is dropped, none is waited for."""
  if pool is not None:
    pool.shutdown(wait=False, cancel_futures=True)


class Lookahead:
  """One bundle's work in flight on `executor` (threads, or a process), oldest first.

  A new one per bundle: a bundle that failed leaves its work behind with it.
  """

  def __init__(self, executor: concurrent.futures.Executor, window: int):
    self._executor = executor
    self._window = window
    self._pending = collections.deque()

  def __len__(self) -> int:
    return len(self._pending)

  def submit(self, fn: Callable, *args) -> None:
    self._pending.append(self._executor.submit(fn, *args))

  def ready(self) -> Iterator:
    """The oldest results while more than `window` are in flight or the oldest is done: waits
    only when the window is full."""
    while self._pending and (len(self._pending) > self._window or self._pending[0].done()):
      yield self._pending.popleft().result()

  def drain(self) -> Iterator:
    """Every result still in flight, oldest first (at the end of a bundle)."""
    while self._pending:
      yield self._pending.popleft().result()
