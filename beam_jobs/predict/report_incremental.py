"""The report's section on an incremental or resumed run: what was reused, predicted, removed.

Usage:
  section = render_incremental(summary.get('incremental'))   # '' for a run without earlier rows
"""
import html
import math

from beam_jobs.predict.config import REMOVED_FILE

__all__ = ['render_incremental']

# (summary key, card name), in the order a user reads the run.
_CARDS = (('carried', 'Carried over'), ('resumed', 'Resumed'), ('new', 'Predicted: new'),
          ('changed', 'Predicted: bytes changed'), ('other_model', 'Predicted: other model'),
          ('removed', 'Removed'))


def _count_text(value) -> str:
  try:
    number = float(value)
  except (TypeError, ValueError):
    return '—'
  return f'{int(number):,}' if math.isfinite(number) else '—'


def render_incremental(block) -> str:
  """The section as an HTML fragment, every string from the data escaped; '' without a block."""
  if not isinstance(block, dict):
    return ''
  source = block.get('previous_output')
  note = ('Rows of unchanged images (same name, same sha256 of the file, same model version and '
          'thresholds) are reused; every other image was predicted.')
  if source:
    note += f' Earlier output: {html.escape(str(source))}; removed images are in {REMOVED_FILE}.'
  if block.get('note'):
    note += f' <strong>{html.escape(str(block["note"]))}</strong>'
  cards = ''.join(f'<div class="card"><div class="value">{_count_text(block.get(key))}</div>'
                  f'<div class="name">{name}</div></div>' for key, name in _CARDS)
  return (f'<section><h2>Reused and predicted</h2><p class="note">{note}</p>'
          f'<div class="cards">{cards}</div></section>')
