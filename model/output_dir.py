"""The one output-folder policy of every stage: a job owns only what it can prove it wrote.

Output folders belong to the user. Before a stage writes anything it calls `claim_output_dir`:

- An output folder that equals, contains or lies inside one of the stage's inputs is refused
  (`check_outputs_apart`): clearing or filling it could destroy the inputs.
- A folder holding any file that the stage's `OutputLayout` does not name is refused, with or
  without --overwrite, naming a few of those files: nothing in it is touched.
- A folder holding only this stage's files is proved ours by this stage's manifest (a finished
  run) or claim file (a run that started, then was killed or failed). Without --overwrite it is
  refused with what it holds; with --overwrite exactly those files are deleted, one by one, and
  then the folders of the layout that are left empty. Never a folder recursively, never a pattern
  over a whole sub-tree.
- --resume is the other way past an unfinished run, for a stage whose layout keeps completed work
  (`kept_on_resume`): only when the claim file names the same job, and then every file of the
  layout except that completed work is deleted. A finished run is never resumed.
- One live run per folder. A local folder is locked (`flock` on the folder itself: no file is
  created, and the operating system releases the lock when the process dies, however it dies)
  before anything in it is judged; a folder another live run holds is refused in one line naming
  its process, host and start. An object-store folder cannot be locked: its claim file names the
  owner's host, boot and process, and a claim of a process still running on this machine (or of
  another machine, which cannot be checked from here) holds it unless --overwrite or --resume is
  given. So only a dead run is ever "unfinished".
- Then the claim file is written, before the pipeline starts, so that a run killed at any point
  leaves a folder the next run can prove is its own.

Usage:
  with claim_output_dir(out, PREDICT_LAYOUT, overwrite=args.overwrite,
                        inputs={'--input': folder, '--model_dir': model_dir}):
    ...   # the run; the folder is released when the block ends (or the process dies)
"""
import dataclasses
import errno
import fcntl
import fnmatch
import glob
import json
import os
import socket

from apache_beam.io.filesystems import FileSystems

from model import schema
from model.manifest import is_local_path, utc_timestamp

__all__ = ['CLAIM_FILE', 'FolderClaim', 'OutputLayout', 'OutputRefused', 'check_outputs_apart',
           'claim_output_dir', 'hold_folder', 'list_files', 'refuse_unknown_files', 'unknown_files',
           'with_beam_temporaries']

CLAIM_FILE = '.planet-claim.json'
# Beam's file sinks write into beam-temp-<prefix>-<uuid>/ folders beside their outputs.
_BEAM_TEMPORARIES = ('beam-temp-*/*',)
_NAMED_IN_MESSAGES = 5


class OutputRefused(ValueError):
  """An output folder this stage may not write into; raised before anything is touched."""


@dataclasses.dataclass(frozen=True)
class OutputLayout:
  """Every file a stage writes in its output folder, as patterns relative to it.

  Attributes:
    stage: the stage name its manifest and claim file carry.
    files: fnmatch patterns of the stage's outputs and its own temporaries ('/' separates
      folders; '*' does not cross one).
    kept_on_resume: patterns (among `files`) of completed work that --resume keeps.
  """
  stage: str
  files: tuple[str, ...]
  kept_on_resume: tuple[str, ...] = ()

  def owns(self, relative: str) -> bool:
    if relative in (CLAIM_FILE, schema.MANIFEST_FILE, schema.MANIFEST_FILE + '.tmp'):
      return True
    return _matches(relative, self.files)

  def kept(self, relative: str) -> bool:
    """Whether --resume keeps this file (completed work of the unfinished run)."""
    return _matches(relative, self.kept_on_resume)

  def folders(self) -> set[str]:
    """The sub-folders the layout writes into (removed when empty after an --overwrite)."""
    return {pattern.rsplit('/', 1)[0] for pattern in self.files if '/' in pattern}


def _matches(relative: str, patterns: tuple[str, ...]) -> bool:
  depth = relative.count('/')
  return any(pattern.count('/') == depth and fnmatch.fnmatchcase(relative, pattern)
             for pattern in patterns)


def with_beam_temporaries(*files: str) -> tuple[str, ...]:
  """`files` plus the temporaries Beam's sinks write beside each folder of them."""
  folders = sorted({f.rsplit('/', 1)[0] + '/' if '/' in f else '' for f in files})
  return tuple(files) + tuple(folder + temporary for folder in folders
                              for temporary in _BEAM_TEMPORARIES)


def _normalized(path: str) -> str:
  if is_local_path(path):
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))
  return path.rstrip('/')


def _inside(inner: str, outer: str) -> bool:
  return inner == outer or inner.startswith(outer.rstrip('/') + '/')


Inputs = dict[str, str | None] | list[tuple[str, str | None]]


def check_outputs_apart(outputs: dict[str, str], inputs: Inputs) -> None:
  """Refuses an output that equals, contains or lies inside an input, or another output.

  Args:
    outputs: flag -> output folder.
    inputs: flag -> input path (a folder or a file; None where not given), as a dict or as pairs
      (a flag given more than once). Links are resolved, so a link to an input is the input.

  Raises:
    OutputRefused: naming both flags; nothing has been touched.
  """
  def refuse(out_flag, out, other_flag, other, relation):
    raise OutputRefused(
        f'{out_flag} {out} {relation} {other_flag} {other}: a stage never writes where its '
        'inputs are (clearing it could destroy them); nothing was touched. Choose an '
        f'{out_flag} outside every input')

  items = list(outputs.items())
  given = [(flag, path) for flag, path in (inputs.items() if isinstance(inputs, dict) else inputs)
           if path]
  for i, (out_flag, out) in enumerate(items):
    real_out = _normalized(out)
    for other_flag, other in given + items[i + 1:]:
      real_other = _normalized(other)
      if real_out == real_other:
        refuse(out_flag, out, other_flag, other, 'is')
      if _inside(real_other, real_out):
        refuse(out_flag, out, other_flag, other, 'contains')
      if _inside(real_out, real_other):
        refuse(out_flag, out, other_flag, other, 'lies inside')


def list_files(folder: str) -> list[str]:
  """Every entry below `folder` that is not a folder (links not followed), relative to it."""
  if is_local_path(folder):
    found = []
    for root, dirs, files in os.walk(folder):
      # A link to a folder is listed as an entry (never followed, never deleted through).
      found += [os.path.relpath(os.path.join(root, name), folder)
                for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]]
    return sorted(found)
  prefix = folder.rstrip('/') + '/'
  matched = FileSystems.match([prefix + '**'])[0].metadata_list
  return sorted(m.path[len(prefix):] for m in matched)


def unknown_files(files: list[str], layout: OutputLayout) -> list[str]:
  return [f for f in files if not layout.owns(f)]


def refuse_unknown_files(folder: str, layout: OutputLayout, flag: str) -> list[str]:
  """The files in `folder` (relative), all of them named by `layout`; else refuses.

  Raises:
    OutputRefused: naming a few of the files the stage did not write.
  """
  files = list_files(folder) if FileSystems.exists(folder) else []
  unknown = unknown_files(files, layout)
  if unknown:
    raise OutputRefused(
        f'{flag} {folder} holds {_count(unknown, "file")} that {layout.stage} did not write '
        f'({_describe(unknown)}); nothing was touched, with or without --overwrite. Choose a '
        f'new or empty {flag}, or move those files out')
  return files


def _read_json(path: str) -> dict | None:
  try:
    with FileSystems.open(path) as f:
      value = json.loads(f.read(1 << 20).decode('utf-8'))
    return value if isinstance(value, dict) else None
  except Exception:  # pylint: disable=broad-except  # unreadable = not proof of anything
    return None


def _proof(folder: str, layout: OutputLayout) -> str | None:
  """'finished' or 'unfinished' when this stage's manifest or claim file is there, else None."""
  for name, state in ((schema.MANIFEST_FILE, 'finished'), (CLAIM_FILE, 'unfinished')):
    record = _read_json(FileSystems.join(folder, name))
    if record is not None and record.get('stage') == layout.stage:
      return state
  return None


def _count(items: list, noun: str) -> str:
  return f'{len(items)} {noun}' + ('' if len(items) == 1 else 's')


def _describe(files: list[str]) -> str:
  named = ', '.join(repr(f[:120]) for f in files[:_NAMED_IN_MESSAGES])
  more = len(files) - _NAMED_IN_MESSAGES
  return named + (f' and {more} more' if more > 0 else '')


def _delete(folder: str, files: list[str], layout: OutputLayout) -> None:
  FileSystems.delete([FileSystems.join(folder, f) for f in files])
  if not is_local_path(folder):
    return   # object stores have no folders to leave behind
  # Deepest first, and only folders the layout writes into, and only when empty. A folder named
  # by a pattern (Beam's beam-temp-*) counts too when it holds nothing: a job killed before its
  # sinks finished leaves them empty, and they would outlive --overwrite and --resume.
  candidates = {os.path.dirname(f) for f in files} | layout.folders()
  candidates |= {os.path.relpath(path, folder) for pattern in layout.folders()
                 for path in glob.glob(os.path.join(glob.escape(folder), pattern))
                 if os.path.isdir(path) and not os.path.islink(path)}
  for relative in sorted((c for c in candidates if c), key=lambda c: -c.count('/')):
    try:
      os.rmdir(os.path.join(folder, relative))
    except OSError:
      pass   # not empty, or not there: left as it is


def _check_resumable(output_dir: str, layout: OutputLayout, proof: str, job: dict | None,
                     flag: str) -> None:
  """Refuses --resume unless the folder holds an unfinished run of this same job."""
  if proof == 'finished':
    raise OutputRefused(
        f'{flag} {output_dir} holds a finished run of {layout.stage} (its manifest): there is '
        f'nothing to resume. Use it as it is (or as the previous output of a run into a new '
        f'{flag}), or pass --overwrite instead of --resume to start over')
  claimed = (_read_json(FileSystems.join(output_dir, CLAIM_FILE)) or {}).get('job')
  if job is not None and claimed != job:
    differing = sorted(k for k in set(job) | set(claimed or {})
                       if (claimed or {}).get(k) != job.get(k))
    raise OutputRefused(
        f'{flag} {output_dir} holds an unfinished run of another {layout.stage} job (it differs '
        f'in: {", ".join(differing)}); --resume continues only the same job. Give the same '
        'arguments, or pass --overwrite instead of --resume to start over')


class FolderClaim:
  """A run's hold on its output folder, from `claim_output_dir` until `release` (or the process's
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
    record = _read_json(path)
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
    raise OutputRefused(
        f'{flag} {folder} is in use by {_who(_read_json(FileSystems.join(folder, CLAIM_FILE)), layout.stage)}, '
        f'still running; nothing was touched. Wait for it to end, or choose another {flag}') from None
  return fd


def _check_remote_claim(folder: str, layout: OutputLayout, flag: str, taking_over: bool) -> None:
  """An object-store folder: refuses it while its claim names a live run (or one this machine
  cannot check, unless the user takes it over with --overwrite or --resume)."""
  record = _read_json(FileSystems.join(folder, CLAIM_FILE))
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


def claim_output_dir(output_dir: str, layout: OutputLayout, overwrite: bool,
                     inputs: Inputs | None = None, flag: str = '--output_dir',
                     resume: bool = False,
                     job: dict | None = None) -> FolderClaim:
  """Makes `output_dir` this run's, or refuses before anything is touched.

  Args:
    output_dir: the folder (local or gs://); created when missing.
    layout: what the stage writes there.
    overwrite: delete an earlier run of this stage (proved by its manifest or claim file).
    inputs: flag -> input path; the folder may not overlap any of them.
    flag: the output folder's flag, for messages.
    resume: continue an unfinished run of the same `job`: its files are deleted except
      `layout.kept_on_resume`. An empty or new folder simply starts; a finished run is refused.
    job: what makes two runs the same job (JSON values), recorded in the claim file.

  Returns:
    The claim, held until released (the run's end) or until the process dies.

  Raises:
    OutputRefused: with what it holds and what to do.
  """
  check_outputs_apart({flag: output_dir}, inputs or {})
  if (is_local_path(output_dir) and os.path.lexists(output_dir)
      and not os.path.isdir(output_dir)):
    raise OutputRefused(f'{flag} {output_dir} is a file, not a folder: give a folder path '
                        '(it is created when missing)')
  claim = _lock(output_dir, layout, flag, taking_over=overwrite or resume)
  try:
    _make_room(output_dir, layout, overwrite, resume, job, flag)
    _write_claim(output_dir, layout, job)
  except BaseException:
    claim.release()
    raise
  return claim


def hold_folder(folder: str, layout: OutputLayout, flag: str) -> FolderClaim:
  """Holds `folder` (created when missing) for this run, as `claim_output_dir` does, for a stage
  that judges the folder's contents itself (model.train's --job_dir).

  Raises:
    OutputRefused: another live run holds it.
  """
  claim = _lock(folder, layout, flag, taking_over=False)
  try:
    _write_claim(folder, layout, None)
  except BaseException:
    claim.release()
    raise
  return claim


def _lock(folder: str, layout: OutputLayout, flag: str, taking_over: bool) -> FolderClaim:
  if is_local_path(folder):
    # A missing folder is made first (it holds nothing to judge), so that it can be locked.
    os.makedirs(folder, exist_ok=True)
    return FolderClaim(folder, _lock_local_folder(folder, layout, flag))
  _check_remote_claim(folder, layout, flag, taking_over)
  return FolderClaim(folder, None)


def _write_claim(folder: str, layout: OutputLayout, job: dict | None) -> None:
  record = {'stage': layout.stage, 'claimed': utc_timestamp(), 'owner': _owner(),
            **({'job': job} if job is not None else {})}
  with FileSystems.create(FileSystems.join(folder, CLAIM_FILE)) as f:
    f.write(json.dumps(record).encode('utf-8'))


def _make_room(output_dir: str, layout: OutputLayout, overwrite: bool, resume: bool,
               job: dict | None, flag: str) -> None:
  """Judges what the (held) folder holds and deletes what this run may and must delete."""
  files = refuse_unknown_files(output_dir, layout, flag)
  if not files:
    return
  proof = _proof(output_dir, layout)
  if proof is None:
    raise OutputRefused(
        f'{flag} {output_dir} holds files named like {layout.stage} outputs '
        f'({_describe(files)}) but no {layout.stage} manifest or claim file proves this job '
        f'wrote them; nothing was touched. Delete them yourself, or choose a new {flag}')
  if resume:
    _check_resumable(output_dir, layout, proof, job, flag)
    files = [f for f in files if not layout.kept(f)]
  elif not overwrite:
    what = ('a finished run' if proof == 'finished'
            else 'an unfinished run (killed or failed: no manifest)')
    or_resume = (', or --resume to continue it keeping its completed work'
                 if proof == 'unfinished' and layout.kept_on_resume else '')
    raise OutputRefused(
        f'{flag} {output_dir} holds {what} of {layout.stage}; pass --overwrite to delete '
        f'exactly those {_count(files, "file")}{or_resume}, or choose another {flag}')
  # The manifest goes first: from here on the folder reads as unfinished to every consumer.
  if schema.MANIFEST_FILE in files:
    FileSystems.delete([FileSystems.join(output_dir, schema.MANIFEST_FILE)])
  _delete(output_dir, [f for f in files if f not in (schema.MANIFEST_FILE, CLAIM_FILE)],
          layout)
