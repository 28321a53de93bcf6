"""A local run's encoder processes: read, hash, decode, serialise and write on every core.

In one Python process the encoder's threads reach about 0.9 of a core of two (Pillow and the
Example's framing hold the GIL for part of each image), and Beam's own worker processes
(`--direct_running_mode=multi_processing`) each start a Python runtime and import Beam, 1.5-2 s
of CPU per core before the first image. So a local run forks one encoder process per core before
the pipeline is built (`started`): they inherit every module already imported, and run only the
pure work of `encode.encode_and_append`. Each process appends the Examples of a batch to its own
part file of each shard (one gzip member per batch when compressed); only part names, dead
letters and each image's split and labels come back. The Examples' bytes never cross a process
boundary. When a split's shard count is a multiple of the processes (the driver rounds the
counts it chooses, `shards_per_process`), each of its shards belongs to one process, so it is
written by that one process alone and published by a rename.

A Dataflow worker, or one of Beam's local worker processes, never has these processes: the
fused DoFn (encode.py) then decodes on threads, as before.

Usage (the driver, around the local pipeline):
  with started(processes=cores):
    pipeline.run().wait_until_finish()
"""
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, NamedTuple

__all__ = ['EncoderProcesses', 'pool', 'shards_per_process', 'started']


def shards_per_process(num_shards: tuple[tuple[str, int], ...],
                       processes: int) -> tuple[tuple[str, int], ...]:
  """A split's shard count, when it is more than one, rounded up to a multiple of `processes`,
  for a run that chose its own counts: each process then owns as many shards of the split as
  every other, writes them whole, and a shard is its one part renamed (no byte copied to
  publish it). A split small enough for one shard keeps one (its parts are concatenated)."""
  return tuple((split, count if count == 1 else -(-count // processes) * processes)
               for split, count in num_shards)


class EncoderProcesses(NamedTuple):
  """One single-process executor per encoder process, so that a batch can be sent to a given
  process: the one that owns the shard its images go to (encode.py)."""
  executors: tuple[ProcessPoolExecutor, ...]


_POOL: EncoderProcesses | None = None
_ORPHAN_CHECK_SECONDS = 0.2


def pool() -> EncoderProcesses | None:
  """This process's encoder processes, when the driver started them (a local run); else None."""
  return _POOL


def _start_encoder_process(driver: int) -> None:
  """In each encoder process, first: it ends with the driver, however the driver ends."""
  # Ctrl-C reaches the whole process group: the driver alone reports it and exits.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  # A forked process holds both ends of its task pipe, so the driver's end (an exit on Ctrl-C,
  # a kill) is no end of file for it: it watches for being orphaned instead, and so never
  # outlives the driver or holds the driver's terminal or pipes open.
  threading.Thread(target=_exit_when_orphaned, args=(driver,), daemon=True,
                   name='exit-with-driver').start()


def _exit_when_orphaned(driver: int) -> None:
  while os.getppid() == driver:
    time.sleep(_ORPHAN_CHECK_SECONDS)
  os._exit(1)  # pylint: disable=protected-access


@contextlib.contextmanager
def started(processes: int) -> Iterator[None]:
  """Forks `processes` encoder processes now, for the encoder DoFns of this process to use.

  Forked before the pipeline starts any thread of its own, so that no child inherits a lock
  held by another thread. A process that dies (a crash in a decoder library) fails the batch
  that it held with BrokenProcessPool, and so the job: nothing waits for it.
  """
  global _POOL  # pylint: disable=global-statement
  from PIL import JpegImagePlugin  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  fork = multiprocessing.get_context('fork')
  executors = tuple(ProcessPoolExecutor(1, mp_context=fork, initializer=_start_encoder_process,
                                        initargs=(os.getpid(),))
                    for _ in range(processes))
  try:
    for executor in executors:   # a fork-context executor forks its process on its first task
      executor.submit(int).result()
    _POOL = EncoderProcesses(executors)
    yield
  finally:
    _POOL = None
    for executor in executors:
      executor.shutdown(wait=True, cancel_futures=True)
