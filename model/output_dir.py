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
- One live run per folder (`model/folder_claim.py`): the folder is held before anything in it
  is judged, and a folder another live run holds is refused in one line naming its process, host
  and start. So only a dead run is ever "unfinished".
- Then the claim file is written, before the pipeline starts, so that a run killed at any point
  leaves a folder the next run can prove is its own.

Usage:
  with claim_output_dir(out, PREDICT_LAYOUT, overwrite=args.overwrite,
                        inputs={'--input': folder, '--model_dir': model_dir}):
    ...   # the run; the folder is released when the block ends (or the process dies)
"""
import glob
import os

from apache_beam.io.filesystems import FileSystems

from model import schema
from model.folder_claim import FolderClaim, lock_folder, read_record, write_claim
from model.manifest import is_local_path
from model.output_layout import (CLAIM_FILE, OutputLayout, OutputRefused, count_of,
                                 describe_files, list_files, refuse_unknown_files,
                                 with_beam_temporaries)

# claim_output_dir takes an OutputLayout and returns a FolderClaim: the jobs import those (and the
# layout's helpers) with it, from here.
__all__ = ['FolderClaim', 'OutputLayout', 'OutputRefused', 'check_outputs_apart',
           'claim_output_dir', 'list_files', 'with_beam_temporaries']


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


def _proof(folder: str, layout: OutputLayout) -> str | None:
  """'finished' or 'unfinished' when this stage's manifest or claim file is there, else None."""
  for name, state in ((schema.MANIFEST_FILE, 'finished'), (CLAIM_FILE, 'unfinished')):
    record = read_record(FileSystems.join(folder, name))
    if record is not None and record.get('stage') == layout.stage:
      return state
  return None


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
  claimed = (read_record(FileSystems.join(output_dir, CLAIM_FILE)) or {}).get('job')
  if job is not None and claimed != job:
    differing = sorted(k for k in set(job) | set(claimed or {})
                       if (claimed or {}).get(k) != job.get(k))
    raise OutputRefused(
        f'{flag} {output_dir} holds an unfinished run of another {layout.stage} job (it differs '
        f'in: {", ".join(differing)}); --resume continues only the same job. Give the same '
        'arguments, or pass --overwrite instead of --resume to start over')


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
  claim = lock_folder(output_dir, layout, flag, taking_over=overwrite or resume)
  try:
    _make_room(output_dir, layout, overwrite, resume, job, flag)
    write_claim(output_dir, layout, job)
  except BaseException:
    claim.release()
    raise
  return claim


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
        f'({describe_files(files)}) but no {layout.stage} manifest or claim file proves this job '
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
        f'exactly those {count_of(files, "file")}{or_resume}, or choose another {flag}')
  # The manifest goes first: from here on the folder reads as unfinished to every consumer.
  if schema.MANIFEST_FILE in files:
    FileSystems.delete([FileSystems.join(output_dir, schema.MANIFEST_FILE)])
  _delete(output_dir, [f for f in files if f not in (schema.MANIFEST_FILE, CLAIM_FILE)],
          layout)
