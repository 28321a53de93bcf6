"""The encoder's processes: read, hash, decode, serialise and write on every core of a worker.

In one Python process the encoder's threads reach about one core (Pillow and the Example's
framing hold the GIL for part of each image), so on a machine whose runner gives a pipeline one
process (the DirectRunner in-process, the default local run) the encoder DoFn runs its work in
processes of its own. They belong to the pipeline: the DoFn acquires them in `setup()` through
Beam's `Shared` (one set per worker process, shared by the DoFn's instances there and released
with them), sized by the job's `--encoder_processes`, whose default is the cores on a local run
and 0 (the DoFn's threads) where the runner already runs a process per core (Dataflow, the
portable runner, `--direct_running_mode=multi_processing`). Nothing is set by the driver for the
workers to find.

The processes come from a forkserver that imports the encoder once: each is a fork of that
single-threaded server with every import done, never of the pipeline's threaded worker (a fork of
a threaded process can inherit a lock that another thread held), and none inherits the output
folder's lock. Each runs only the pure work of `encode.encode_and_append`, appending Examples to
its own part files; only part names, dead letters and tallies come back.

Usage (in the encoder DoFn):
  self._shared = shared.Shared()                           # __init__
  self._processes = acquire(self._shared, processes)       # setup()
  self._processes.executors[lane].submit(encode_and_append, ...)
"""
import atexit
import multiprocessing
import os
import signal
import threading
import weakref
from concurrent.futures import ProcessPoolExecutor

from apache_beam.utils import shared

__all__ = ['EncoderProcesses', 'acquire']

# What the forkserver imports once, so that each process it forks starts with them loaded.
_PRELOAD = ['beam_jobs.preprocess.encode', 'PIL.JpegImagePlugin']


def _start_encoder_process(job_alive) -> None:
  """In each encoder process, first: it ends with the job's process, however that ends."""
  # Ctrl-C reaches the whole process group: the job's process alone reports it and exits.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  threading.Thread(target=_exit_when_job_ends, args=(job_alive,), daemon=True,
                   name='exit-with-job').start()


def _exit_when_job_ends(job_alive) -> None:
  # The read end of a pipe whose only write end the job's process holds: end of file once it
  # is gone. (Not the parent's pid: the parent is the forkserver, which itself lives as long as
  # any process it forked holds its own pipe; nor the executor's queue, whose write end every
  # worker holds too.)
  try:
    job_alive.recv_bytes()
  except (EOFError, OSError):
    pass
  os._exit(1)  # pylint: disable=protected-access


class EncoderProcesses:
  """One single-process executor per encoder process, so that a batch can be sent to a given
  process: the one that owns the shard its images go to (encode.py). A process that dies (a
  crash in a decoder library) fails the batch it held with BrokenProcessPool, and so the job:
  nothing waits for it. The processes end when this object is collected (the executors' own
  rule), at `shutdown`, or when the worker process exits."""

  def __init__(self, count: int):
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload(_PRELOAD)
    job_alive, self._alive = context.Pipe(duplex=False)   # written by nobody, ever
    self.executors = tuple(ProcessPoolExecutor(1, mp_context=context,
                                               initializer=_start_encoder_process,
                                               initargs=(job_alive,))
                           for _ in range(count))
    for executor in self.executors:   # started now, so that a broken start fails in setup()
      executor.submit(int).result()
    job_alive.close()   # each process has its own copy; this one would keep them alive
    # Ended before the interpreter's teardown, where an executor collected late cannot stop;
    # by a weak reference, so that a set no DoFn holds any more is still collected at once.
    atexit.register(_shutdown_if_alive, weakref.ref(self))

  def shutdown(self) -> None:
    for executor in self.executors:
      executor.shutdown(wait=True, cancel_futures=True)


def _shutdown_if_alive(processes: 'weakref.ref[EncoderProcesses]') -> None:
  alive = processes()
  if alive is not None:
    alive.shutdown()


def acquire(handle: shared.Shared, count: int) -> EncoderProcesses:
  """This worker process's `count` encoder processes for the DoFn whose `Shared` handle this is
  (its pickled copies share it; another DoFn has another handle), started on the first call."""
  return handle.acquire(lambda: EncoderProcesses(count), tag=f'encoder-processes-{count}')
