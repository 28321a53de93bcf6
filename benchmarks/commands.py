"""Runs a command as a user would, timing it whole and sampling the memory of its process tree.

`ru_maxrss` would miss the sum over a job's worker processes (it is the largest single process),
and a child forked from a big parent inherits the parent's high-water mark, so both the tree's
total RSS and its largest single process are sampled from /proc every 0.2 s while it runs.

`in_process=True` (the `--tiny` plan, for the harness's own test) calls the module's `main(argv)`
in this process instead: the same command line without an interpreter's start-up, so its times
and memory mean nothing beyond "the command ran".
"""
import contextlib
import dataclasses
import importlib
import io
import os
import resource
import subprocess
import sys
import threading
import time


@dataclasses.dataclass
class CommandRun:
  seconds: float           # wall clock from start to exit, start-up included
  peak_rss_mb: float       # largest sampled total RSS of the command and its descendants
  max_process_rss_mb: float  # largest sampled RSS of a single process of the tree
  output_tail: str
  cpu_seconds: float = 0.0   # user + system CPU of the command and the children it waited for


def _children(pid: int) -> list[int]:
  """Every descendant of `pid`: each thread keeps its own list (Beam starts workers from threads)."""
  found = []
  try:
    threads = os.listdir(f'/proc/{pid}/task')
  except OSError:
    return []
  for thread in threads:
    try:
      with open(f'/proc/{pid}/task/{thread}/children', encoding='ascii') as f:
        found += [int(p) for p in f.read().split()]
    except OSError:
      continue
  for child in list(found):
    found += _children(child)
  return found


def _rss_bytes(pid: int) -> int:
  try:
    with open(f'/proc/{pid}/statm', encoding='ascii') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except (OSError, IndexError, ValueError):
    return 0


def tree_rss_bytes(pid: int) -> int:
  return sum(_rss_bytes(p) for p in [pid, *_children(pid)])


def tree_rss_sample(pid: int) -> tuple[int, int]:
  """(total RSS, largest single RSS) of `pid` and its descendants, in bytes."""
  sizes = [_rss_bytes(p) for p in [pid, *_children(pid)]]
  return sum(sizes), max(sizes)


def python_module(module: str, *args: str) -> list[str]:
  return [sys.executable, '-m', module, *args]


def _run_in_this_process(command: list[str]) -> CommandRun:
  if command[:2] != [sys.executable, '-m']:
    raise ValueError(f'only `python -m module ...` runs in process, not {command}')
  output = io.StringIO()
  cpu_before = resource.getrusage(resource.RUSAGE_SELF)
  started = time.perf_counter()
  try:
    with contextlib.redirect_stdout(output):
      importlib.import_module(command[2]).main(command[3:])
  except SystemExit as e:
    if e.code not in (None, 0):
      raise subprocess.CalledProcessError(1, command, output=f'{output.getvalue()}{e}') from None
  seconds = time.perf_counter() - started
  rss = tree_rss_bytes(os.getpid()) / 2**20
  usage = resource.getrusage(resource.RUSAGE_SELF)
  cpu = (usage.ru_utime - cpu_before.ru_utime) + (usage.ru_stime - cpu_before.ru_stime)
  return CommandRun(seconds, rss, usage.ru_maxrss / 1024, output.getvalue()[-4000:], cpu)


def run_command(command: list[str], timeout_s: float = 3600, env: dict | None = None,
                in_process: bool = False) -> CommandRun:
  """Runs `command` to its end; raises CalledProcessError (with its output's tail) if it fails."""
  if in_process:
    return _run_in_this_process(command)
  environment = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', **(env or {})}
  log_path = f'/tmp/planet_bench_cmd_{os.getpid()}_{threading.get_ident()}.log'
  with open(log_path, 'w+b') as log:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    peak = largest = 0
    stop = threading.Event()

    def sample():
      nonlocal peak, largest
      while not stop.wait(0.2):
        total, single = tree_rss_sample(process.pid)
        peak, largest = max(peak, total), max(largest, single)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    killer = threading.Timer(timeout_s, process.kill)
    killer.start()
    try:
      # wait4's usage covers the process and every child it waited for (Beam's workers).
      _, status, usage = os.wait4(process.pid, 0)
    except BaseException:
      process.kill()
      process.wait()
      raise
    finally:
      killer.cancel()
      stop.set()
      sampler.join()
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    log.seek(0)
    tail = log.read()[-4000:].decode('utf-8', 'replace')
  os.remove(log_path)
  if process.returncode != 0:
    raise subprocess.CalledProcessError(process.returncode, command, output=tail)
  return CommandRun(seconds, peak / 2**20, largest / 2**20, tail,
                    usage.ru_utime + usage.ru_stime)
