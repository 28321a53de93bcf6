"""Image names that are the same text in two Unicode normalization forms: told apart, explained.

A file system compares names byte by byte, so 'café' composed (NFC, what most editors and
spreadsheets write) and 'café' decomposed (NFD, what macOS and some archivers write) are two file
names. Both jobs match names exactly, as the file system does, and where a name has no partner
but the same text in the other form has one, their messages name it and the two forms, so the
user can rename one side. One rule for both jobs: preprocess's join (a CSV row without its file)
and predict's scoring (a predicted image without a label row).

Usage:
  forms = OtherForms(csv_names)
  forms.partner('cafe\u0301')           # 'café' if the CSV writes it composed, else None
  mismatch_text('cafe\u0301', 'café')   # "'café' ... in NFC (composed characters), ... NFD ..."
"""
import unicodedata
from typing import Iterable

__all__ = ['OtherForms', 'mismatch_text', 'nfc', 'normalization_form']


def nfc(name: str) -> str:
  """The name in NFC: the key under which a name's forms meet."""
  return unicodedata.normalize('NFC', name)


def normalization_form(name: str) -> str:
  """Which Unicode normalization form a name is written in, for a message."""
  if unicodedata.is_normalized('NFC', name):
    return 'NFC (composed characters)'
  if unicodedata.is_normalized('NFD', name):
    return 'NFD (decomposed characters)'
  return 'neither NFC nor NFD (a mix)'


def mismatch_text(name: str, other: str) -> str:
  """Why `name` did not meet `other` (the same text in another form), and what to do."""
  return (f'{other!r} is the same text in {normalization_form(other)}, where {name!r} is in '
          f'{normalization_form(name)}; names in different Unicode normalization forms are '
          'different file names: rename the file, or fix the name in the CSV, so that both are '
          'written alike')


class OtherForms:
  """Finds, for a name, another name of a set that is the same text in another form.

  Holds only the names that are not in NFC (few, in practice) beside the set itself, so an index
  of a labels CSV costs next to nothing beyond the CSV's own dict.
  """

  def __init__(self, names: Iterable[str]):
    self._names = names if isinstance(names, (set, frozenset, dict)) else set(names)
    self._by_nfc = {}
    for name in self._names:
      if not unicodedata.is_normalized('NFC', name):
        self._by_nfc.setdefault(nfc(name), name)

  def partner(self, name: str) -> str | None:
    """A name of the set, not `name` itself, with the same NFC form; None if there is none."""
    form = nfc(name)
    if form != name and form in self._names:
      return form
    other = self._by_nfc.get(form)
    return other if other is not None and other != name else None
