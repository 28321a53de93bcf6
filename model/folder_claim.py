"""One live run per output folder: a run's claim on it, and who holds a claim.

A local folder is locked with `flock` on the folder itself (no file is created, and the operating
system releases the lock when the process dies, however it dies). An object-store folder cannot
be locked: its claim file names the owner's host, boot and process, and a claim of a process still
running on this machine (or of another machine, which cannot be checked from here) holds it
unless the user takes it over.

Usage:
  with hold_folder(job_dir, JOB_LAYOUT, '--job_dir'):
    ...   # OutputRefused if another live run holds it; released when the block ends
"""
import errno
import fcntl
import json
import os
import socket

from apache_beam.io.filesystems import FileSystems

from model.manifest import is_local_path, utc_timestamp
from model.output_layout import CLAIM_FILE, OutputLayout, OutputRefused

__all__ = ['FolderClaim', 'hold_folder', 'lock_folder', 'read_record', 'write_claim']


def read_record(path: str) -> dict | None:
  """A small JSON object a stage wrote (its claim file or manifest), or None if unreadable."""
  try:
    with FileSystems.open(path) as f:
      value = json.loads(f.read(1 << 20).decode('utf-8'))
    return value if isinstance(value, dict) else None
  except Exception:  # pylint: disable=broad-except  # unreadable = not proof of anything
    return None


class FolderClaim:
  """A run's hold on its output folder, from `lock_folder` until `release` (or the process's
  death: the operating system drops the lock then). A context manager."""

  def __init__(self, folder: str, lock_fd: int | None):
    self.folder = folder
    self._lock_fd = lock_fd
    self._released = False

  def release(self) -> None:
    """Lets another run have the folder. An object store's claim loses its owner, so a later run
    of this same process does not take it for a live one."""
    if self._released:
      return
    self._released = True
    if self._lock_fd is not None:
      fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
      os.close(self._lock_fd)
      return
    path = FileSystems.join(self.folder, CLAIM_FILE)
    record = read_record(path)
    if record is not None and record.get('owner') == _owner():
      record.pop('owner')
      with FileSystems.create(path) as f:
        f.write(json.dumps(record).encode('utf-8'))

  def __enter__(self) -> 'FolderClaim':
    return self

  def __exit__(self, *_) -> None:
    self.release()


def _boot_id() -> str:
  try:
    with open('/proc/sys/kernel/random/boot_id', encoding='ascii') as f:
      return f.read().strip()
  except OSError:
    return ''


def _process_start(pid) -> str | None:
  """When process `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat): a pid
  is reused, a pid with its start time names one process."""
  try:
    with open(f'/proc/{int(pid)}/stat', 'rb') as f:
      fields = f.read().rsplit(b')', 1)[1].split()
  except (OSError, ValueError, TypeError):
    return None
  return fields[19].decode('ascii') if len(fields) > 19 else None


def _owner() -> dict:
  """This process, as a claim file names its owner."""
  return {'host': socket.gethostname(), 'boot_id': _boot_id(), 'pid': os.getpid(),
          'process_start': _process_start(os.getpid())}


def _owner_state(owner) -> str:
  """'running', 'gone' or 'unknown' (a process of another machine) for a claim's owner."""
  if not isinstance(owner, dict):
    return 'gone'
  if owner.get('host') != socket.gethostname():
    return 'unknown'
  if owner.get('boot_id') != _boot_id():
    return 'gone'   # this machine restarted since
  started = _process_start(owner.get('pid'))
  return 'running' if started is not None and started == owner.get('process_start') else 'gone'


def _who(record: dict | None, stage: str) -> str:
  """'a running predict job (pid 12, host h, since 2026-...)', from a claim file."""
  record = record or {}
  owner = record.get('owner') if isinstance(record.get('owner'), dict) else {}
  facts = ', '.join(f'{label} {owner_value}' for label, owner_value in (
      ('pid', owner.get('pid')), ('on host', owner.get('host')),
      ('since', record.get('claimed'))) if owner_value is not None)
  return f'a {record.get("stage") or stage} job' + (f' ({facts})' if facts else '')


def _lock_local_folder(folder: str, layout: OutputLayout, flag: str) -> int:
  """An exclusive lock on the folder itself, or OutputRefused naming the run that holds it."""
  fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
      raise
    holder = _who(read_record(FileSystems.join(folder, CLAIM_FILE)), layout.stage)
    raise OutputRefused(
        f'{flag} {folder} is in use by {holder}, still running; nothing was touched. Wait for it '
        f'to end, or choose another {flag}') from None
  return fd


def _check_remote_claim(folder: str, layout: OutputLayout, flag: str, taking_over: bool) -> None:
  """An object-store folder: refuses it while its claim names a live run (or one this machine
  cannot check, unless the user takes it over with --overwrite or --resume)."""
  record = read_record(FileSystems.join(folder, CLAIM_FILE))
  state = _owner_state((record or {}).get('owner'))
  if state == 'running':
    raise OutputRefused(
        f'{flag} {folder} is in use by {_who(record, layout.stage)}, still running on this '
        f'machine; nothing was touched. Wait for it to end, or choose another {flag}')
  if state == 'unknown' and not taking_over:
    raise OutputRefused(
        f'{flag} {folder} is claimed by {_who(record, layout.stage)} of another machine, which '
        'this one cannot check; nothing was touched. Once you are sure that run has stopped, '
        f'pass --overwrite (or --resume); otherwise choose another {flag}')


def lock_folder(folder: str, layout: OutputLayout, flag: str, taking_over: bool) -> FolderClaim:
  """Holds `folder` (a local one created when missing) before anything in it is judged.

  Raises:
    OutputRefused: another live run holds it (or, for an object store, a run this machine cannot
      check, unless `taking_over`).
  """
  if is_local_path(folder):
    # A missing folder is made first (it holds nothing to judge), so that it can be locked.
    os.makedirs(folder, exist_ok=True)
    return FolderClaim(folder, _lock_local_folder(folder, layout, flag))
  _check_remote_claim(folder, layout, flag, taking_over)
  return FolderClaim(folder, None)


def write_claim(folder: str, layout: OutputLayout, job: dict | None) -> None:
  """The claim file: this stage, this process as its owner, and what makes two runs one job."""
  record = {'stage': layout.stage, 'claimed': utc_timestamp(), 'owner': _owner(),
            **({'job': job} if job is not None else {})}
  with FileSystems.create(FileSystems.join(folder, CLAIM_FILE)) as f:
    f.write(json.dumps(record).encode('utf-8'))


def hold_folder(folder: str, layout: OutputLayout, flag: str) -> FolderClaim:
  """Holds `folder` (created when missing) for this run, as `claim_output_dir` does, for a stage
  that judges the folder's contents itself (model.train's --job_dir).

  Raises:
    OutputRefused: another live run holds it.
  """
  claim = lock_folder(folder, layout, flag, taking_over=False)
  try:
    write_claim(folder, layout, None)
  except BaseException:
    claim.release()
    raise
  return claim
