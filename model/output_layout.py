"""What a stage writes in its output folder (`OutputLayout`), and the refusal of anything else.

Usage:
  LAYOUT = OutputLayout('predict', with_beam_temporaries('predictions/part-*.jsonl'))
  files = refuse_unknown_files(out, LAYOUT, '--output_dir')   # OutputRefused on a stranger's file
"""
import dataclasses
import fnmatch
import os

from apache_beam.io.filesystems import FileSystems

from model import schema
from model.manifest import is_local_path

__all__ = ['CLAIM_FILE', 'OutputLayout', 'OutputRefused', 'count_of', 'describe_files',
           'list_files', 'refuse_unknown_files', 'unknown_files', 'with_beam_temporaries']

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
        f'{flag} {folder} holds {count_of(unknown, "file")} that {layout.stage} did not write '
        f'({describe_files(unknown)}); nothing was touched, with or without --overwrite. Choose '
        f'a new or empty {flag}, or move those files out')
  return files


def count_of(items: list, noun: str) -> str:
  """'1 file', '3 files': a count for a refusal's message."""
  return f'{len(items)} {noun}' + ('' if len(items) == 1 else 's')


def describe_files(files: list[str]) -> str:
  """The first few of `files`, quoted, and how many more: a refusal names, never floods."""
  named = ', '.join(repr(f[:120]) for f in files[:_NAMED_IN_MESSAGES])
  more = len(files) - _NAMED_IN_MESSAGES
  return named + (f' and {more} more' if more > 0 else '')
