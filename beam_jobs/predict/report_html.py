"""Renders the prediction job's summary and a few thumbnails as one self-contained report.html.

Usage:
  thumbnails = [{'image_name': name, 'tags': tags, 'src': thumbnails.make_thumbnail(pixels)}, ...]
  page = render_report(json.load(f), thumbnails)   # one HTML string, written next to summary.json

The page loads nothing and runs nothing: inline CSS, inline SVG charts, thumbnails as `data:`
URIs, no JavaScript. It opens the same from a bucket download, an email attachment or an
air-gapped machine, and a Content-Security-Policy tells the browser to refuse anything else, so
a string from the data that somehow escaped `html.escape` could still neither run nor fetch.
"""
import datetime
import html
import math
import re
from typing import Any, Iterable

from beam_jobs.predict.report_incremental import render_incremental
from beam_jobs.predict.report_style import STYLE_SHEET
from beam_jobs.predict.thumbnails import MAX_THUMBNAILS
from model import schema

__all__ = ['CONTENT_SECURITY_POLICY', 'MAX_DEAD_LETTER_EXAMPLES', 'MAX_MESSAGE_CHARS',
           'render_report']

MAX_DEAD_LETTER_EXAMPLES = 10
MAX_MESSAGE_CHARS = 400

CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

# Only inline base64 images may become an <img src>: a URL there would make the page fetch.
_IMAGE_DATA_URI = re.compile(r'data:image/(?:jpeg|png|webp|gif);base64,[A-Za-z0-9+/]+={0,2}')

_BACKENDS = {'in_process': 'in-process SavedModel', 'grpc': 'TF Serving over gRPC'}
_WEATHER = frozenset(schema.WEATHER_LABELS)

# The bar chart's geometry, in SVG user units (the SVG scales to its container's width).
_CHART_LABEL_WIDTH = 150
_CHART_BAR_WIDTH = 560
_CHART_VALUE_WIDTH = 130
_CHART_ROW_HEIGHT = 24
_CHART_GROUP_GAP = 14


def render_report(summary: dict, thumbnails: list[dict]) -> str:
  """Renders the prediction job's summary as one self-contained HTML page.

  Usage: `path.write_text(render_report(summary, thumbnails), encoding='utf-8')`

  Args:
    summary: the job's summary.json. Optional keys may be missing: `evaluation` only exists when
      labels were given, `dead_letter_examples` when something was dead-lettered.
    thumbnails: `{'image_name', 'tags', 'src'}` dicts; `src` must be an inline `data:image/...`
      URI (see `thumbnails.make_thumbnail`), anything else is shown as a placeholder. The first
      `MAX_THUMBNAILS` are shown.

  Returns:
    The page, as a string; every string from the data is HTML-escaped.
  """
  counts = summary.get('counts') or {}
  title = f'{summary.get("model_name") or "Model"} {_versions_text(summary.get("model_versions"))}'
  body = [
      _header(summary, title),
      _count_cards(summary, counts),
      _accounting_warning(counts),
      render_incremental(summary.get('incremental')),
      _label_chart_section(summary.get('predicted_label_counts') or {}, counts.get('predictions')),
      _evaluation_sections(summary.get('evaluation')),
      _dead_letter_section(summary, counts),
      _thumbnail_section(thumbnails or []),
      '<footer>Written by beam_jobs.predict from summary.json. This page loads no external '
      'resources.</footer>',
  ]
  return (
      '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
      f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
      '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
      f'<title>{_esc(title)}: prediction report</title>\n<style>{STYLE_SHEET}</style>\n</head>\n'
      '<body>\n<main>\n' + '\n'.join(part for part in body if part)
      + '\n</main>\n</body>\n</html>\n')


# ---------------------------------------------------------------------------------------------
# Formatting. summary.json is written by our own job, but a report must still render (with a
# dash) when a value is missing or malformed, rather than fail at the very end of a long run.

def _esc(value: Any) -> str:
  return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  return number if math.isfinite(number) else None


def _int_text(value: Any) -> str:
  number = _number(value)
  return '—' if number is None else f'{int(round(number)):,}'


def _float_text(value: Any, digits: int) -> str:
  number = _number(value)
  return '—' if number is None else f'{number:,.{digits}f}'


def _duration_text(seconds: Any) -> str:
  number = _number(seconds)
  if number is None:
    return '—'
  if number < 60:
    return f'{number:.1f} s'
  minutes, secs = divmod(int(round(number)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours} h {minutes:02d} min' if hours else f'{minutes} min {secs:02d} s'


def _when_text(started_at: Any) -> str:
  if not started_at:
    return 'at an unknown time'
  try:
    when = datetime.datetime.fromisoformat(str(started_at).replace('Z', '+00:00'))
  except ValueError:
    return f'at {started_at}'
  if when.utcoffset() == datetime.timedelta(0):
    return when.strftime('on %Y-%m-%d at %H:%M:%S UTC')
  return f'on {when.isoformat(sep=" ")}'


def _versions_text(versions: Any) -> str:
  if isinstance(versions, (str, int)):
    versions = [versions]
  versions = [str(v) for v in (versions or [])]
  if not versions:
    return '(version unknown)'
  return ('version ' if len(versions) == 1 else 'versions ') + ', '.join(versions)


def _share_text(part: float, whole: float | None) -> str:
  return f'{100 * part / whole:.1f}%' if whole else '—'


# ---------------------------------------------------------------------------------------------
# Sections. Each returns an HTML fragment; only `_esc` output ever carries a string from the data.

def _header(summary: dict, title: str) -> str:
  versions = summary.get('model_versions')
  changed = isinstance(versions, list) and len(versions) > 1
  backend = summary.get('backend')
  backend_text = _BACKENDS.get(backend, backend or 'unknown backend')
  sub = f'Ran {_when_text(summary.get("started_at"))} · {backend_text}'
  if changed:
    # TF Serving loads a new numbered version as soon as it appears, even mid-job.
    sub += ' · the served model version changed during the run'
  return (f'<header><h1>{_esc(title)}</h1>'
          f'<div class="sub">Prediction report. {_esc(sub)}</div></header>')


def _count_cards(summary: dict, counts: dict) -> str:
  dead = _number(counts.get('dead_letters')) or 0
  cards = [
      ('Images matched', _int_text(counts.get('images_matched')), ''),
      ('Predicted', _int_text(counts.get('predictions')), ''),
      ('Dead-lettered', _int_text(counts.get('dead_letters')), ' bad' if dead > 0 else ''),
      ('Elapsed', _duration_text(summary.get('elapsed_seconds')), ''),
      ('Images / second', _float_text(summary.get('images_per_second'), 1), ''),
  ]
  return '<div class="cards">' + ''.join(
      f'<div class="card{extra}"><div class="value">{_esc(value)}</div>'
      f'<div class="name">{name}</div></div>' for name, value, extra in cards) + '</div>'


def _accounting_warning(counts: dict) -> str:
  matched, predicted, dead = (_number(counts.get(k))
                              for k in ('images_matched', 'predictions', 'dead_letters'))
  if None in (matched, predicted, dead) or matched == predicted + dead:
    return ''
  # The job's contract is inputs = outputs + dead letters; say so loudly when it is broken.
  return (f'<div class="warn"><strong>Counts do not add up:</strong> {_int_text(matched)} images '
          f'matched, but {_int_text(predicted)} predicted + {_int_text(dead)} dead-lettered = '
          f'{_int_text(predicted + dead)}.</div>')


def _label_chart_section(label_counts: dict, predictions: Any) -> str:
  total = _number(predictions)
  values = {label: _number(label_counts.get(label)) or 0 for label in schema.ALL_LABELS}
  note = ('Images predicted with each label, in the schema\'s order. Each image has exactly one '
          'weather label, so the weather bars add up to the number of predictions.')
  if not total:
    note = 'No image was predicted, so every count is zero.'
  return ('<section><h2>Predicted labels</h2>'
          f'<p class="note">{note}</p>'
          '<div class="legend"><span><span class="swatch" style="background:var(--weather)">'
          '</span>weather</span><span><span class="swatch" style="background:var(--ground)">'
          '</span>ground</span></div>'
          f'{_bar_chart_svg(values, total)}</section>')


def _bar_chart_svg(values: dict[str, float], total: float | None) -> str:
  """A horizontal bar per label, weather then ground, bars scaled to the largest count."""
  largest = max(values.values(), default=0) or 1
  width = _CHART_LABEL_WIDTH + _CHART_BAR_WIDTH + _CHART_VALUE_WIDTH
  height = len(values) * _CHART_ROW_HEIGHT + _CHART_GROUP_GAP
  rows = []
  for i, (label, value) in enumerate(values.items()):
    group = 'weather' if label in _WEATHER else 'ground'
    y = i * _CHART_ROW_HEIGHT + (_CHART_GROUP_GAP if group == 'ground' else 0)
    bar = _CHART_BAR_WIDTH * value / largest
    # A visible sliver for small non-zero counts: a rare label must not look absent.
    bar = max(bar, 2.0) if value > 0 else 0.0
    text_y = y + _CHART_ROW_HEIGHT / 2 + 4.5
    value_text = f'{int(value):,}' + (f'  ·  {_share_text(value, total)}' if total else '')
    rows.append(
        f'<g><title>{_esc(label)}: {_esc(value_text)}</title>'
        f'<text x="{_CHART_LABEL_WIDTH - 10}" y="{text_y:.1f}" text-anchor="end">'
        f'{_esc(label)}</text>'
        f'<rect class="track" x="{_CHART_LABEL_WIDTH}" y="{y + 4}" width="{_CHART_BAR_WIDTH}" '
        f'height="{_CHART_ROW_HEIGHT - 8}" rx="3"/>'
        f'<rect class="{group}" x="{_CHART_LABEL_WIDTH}" y="{y + 4}" width="{bar:.1f}" '
        f'height="{_CHART_ROW_HEIGHT - 8}" rx="3"/>'
        f'<text class="value" x="{_CHART_LABEL_WIDTH + _CHART_BAR_WIDTH + 8}" y="{text_y:.1f}">'
        f'{_esc(value_text)}</text></g>')
  return (f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
          f'aria-label="Predicted label counts">{"".join(rows)}</svg>')


def _evaluation_sections(evaluation: Any) -> str:
  if not isinstance(evaluation, dict):
    return ('<section><h2>Evaluation</h2><p class="empty">No labels were given (run with '
            '<code>--labels_csv</code> to score the predictions).</p></section>')
  labelled = _number(evaluation.get('labelled_images')) or 0
  unlabelled = _number(evaluation.get('unlabelled_images')) or 0
  note = f'Averaged over {_int_text(labelled)} labelled images'
  if unlabelled:
    note += f'; {_int_text(unlabelled)} predicted images had no label row and are not scored'
    other_forms = _number(evaluation.get('unlabelled_other_form')) or 0
    if other_forms:
      note += (f' ({_int_text(other_forms)} of them because the CSV writes their names in '
               'another Unicode normalization form: see summary.json)')
  f2 = _float_text(evaluation.get('f2'), 3) if labelled else '—'
  return ('<section><h2>Evaluation</h2><div class="eval-row"><div class="f2">'
          f'<div class="headline"><span class="big">{f2}</span>'
          '<span>Kaggle F2<br>(β = 2, per image, then averaged)</span></div>'
          f'<p class="note">{note}.</p></div>{_confusion_block(evaluation)}</div></section>'
          + _per_label_section(evaluation.get('per_label') or {}))


def _metric_cell(value: Any) -> str:
  number = _number(value)
  if number is None:
    return '<td>—</td>'
  fill = 100 * min(max(number, 0.0), 1.0)
  return (f'<td><div class="metric">{number:.3f}<div class="track">'
          f'<div class="fill" style="width:{fill:.1f}%"></div></div></div></td>')


def _per_label_section(per_label: dict) -> str:
  rows = []
  for label in schema.ALL_LABELS:
    scores = per_label.get(label) or {}
    support, predicted = _number(scores.get('support')), _number(scores.get('predicted'))
    unseen = not support and not predicted
    rows.append(
        f'<tr{" class=unseen" if unseen else ""}><td>{_esc(label)}</td>'
        f'<td>{_int_text(support)}</td><td>{_int_text(predicted)}</td>'
        + ''.join(_metric_cell(scores.get(k)) for k in ('precision', 'recall', 'f2')) + '</tr>')
  return ('<section><h2>Per label</h2>'
          '<p class="note">Support: labelled images that have the label. Greyed: the label was '
          'neither in the labels nor predicted.</p>'
          '<table class="per-label"><thead><tr><th>label</th><th>support</th><th>predicted</th>'
          '<th>precision</th><th>recall</th><th>F2</th></tr></thead>'
          f'<tbody>{"".join(rows)}</tbody></table></section>')


def _confusion_block(evaluation: dict) -> str:
  labels = evaluation.get('weather_labels') or list(schema.WEATHER_LABELS)
  matrix = evaluation.get('weather_confusion')
  try:
    matrix = [[int(v) for v in row] for row in matrix]
    valid = len(matrix) == len(labels) and all(len(row) == len(labels) for row in matrix)
  except (TypeError, ValueError):
    valid = False
  if not valid:
    return '<div><p class="empty">No weather confusion matrix in the summary.</p></div>'
  header = ''.join(f'<th class="text">{_esc(label)}</th>' for label in labels)
  rows = []
  for i, (label, row) in enumerate(zip(labels, matrix)):
    row_total = sum(row)
    cells = []
    for j, value in enumerate(row):
      share = value / row_total if row_total else 0.0
      # Shaded by share of the true row: the diagonal green (right), elsewhere red (confused).
      colour = '60,138,76' if i == j else '181,69,47'
      alpha = 0.08 + 0.85 * share if value else 0.0
      ink = '#fff' if share > 0.55 else 'inherit'
      cells.append(f'<td class="cell" style="background:rgba({colour},{alpha:.2f});'
                   f'color:{ink}" title="true {_esc(label)}, predicted {_esc(labels[j])}: '
                   f'{value:,}">{value:,}</td>')
    recall = _share_text(row[i], row_total)
    rows.append(f'<tr><th class="text">{_esc(label)}</th>{"".join(cells)}'
                f'<td>{row_total:,}</td><td>{recall}</td></tr>')
  total = sum(map(sum, matrix))
  accuracy = _share_text(sum(matrix[i][i] for i in range(len(labels))), total)
  return ('<div class="confusion"><h3>Weather confusion</h3>'
          f'<p class="note">Rows: true weather; columns: predicted. Accuracy {accuracy} over '
          f'{total:,} images with a weather label.</p>'
          '<table class="confusion"><thead><tr><th class="corner">true ↓ / predicted →</th>'
          f'{header}<th>total</th><th>recall</th></tr></thead>'
          f'<tbody>{"".join(rows)}</tbody></table></div>')


def _dead_letter_section(summary: dict, counts: dict) -> str:
  reasons = summary.get('dead_letter_reasons') or {}
  examples = summary.get('dead_letter_examples') or []
  dead = _number(counts.get('dead_letters')) or 0
  if not reasons and not examples and not dead:
    return ('<section><h2>Dead letters</h2><p class="empty">None: every matched image was '
            'predicted.</p></section>')
  total = sum(_number(v) or 0 for v in reasons.values()) or dead
  largest_first = sorted(reasons.items(), key=lambda kv: (-(_number(kv[1]) or 0), str(kv[0])))
  reason_rows = ''.join(
      f'<tr><td class="mono">{_esc(reason)}</td><td>{_int_text(count)}</td>'
      f'<td>{_share_text(_number(count) or 0, total)}</td></tr>' for reason, count in largest_first)
  parts = ['<section><h2>Dead letters</h2>',
           '<p class="note">Images that could not be predicted, by reason code; the dead-letter '
           'output has every one of them.</p>']
  if reason_rows:
    parts.append('<table class="reasons"><thead><tr><th>reason</th><th>images</th>'
                 f'<th>share</th></tr></thead><tbody>{reason_rows}</tbody></table>')
  if examples:
    shown = [e for e in examples if isinstance(e, dict)][:MAX_DEAD_LETTER_EXAMPLES]
    example_rows = ''.join(_dead_letter_example_row(e) for e in shown)
    parts.append(f'<h3 class="note">Examples ({len(shown)} of {_int_text(total)})</h3>'
                 '<table class="examples"><thead><tr><th>image</th><th class="text">reason</th>'
                 f'<th class="text">message</th></tr></thead><tbody>{example_rows}</tbody></table>')
  parts.append('</section>')
  return ''.join(parts)


def _dead_letter_example_row(example: dict) -> str:
  message = str(example.get('message') or '')
  if len(message) > MAX_MESSAGE_CHARS:
    message = message[:MAX_MESSAGE_CHARS] + '…'
  path = example.get('path')
  path_html = f'<span class="path">{_esc(path)}</span>' if path else ''
  name = example.get('image_name', '—')
  return (f'<tr><td class="text"><strong>{_esc(name)}</strong>{path_html}</td>'
          f'<td class="text mono">{_esc(example.get("reason", "—"))}</td>'
          f'<td class="text message">{_esc(message)}</td></tr>')


def _thumbnail_section(thumbnails: list[dict]) -> str:
  if not thumbnails:
    return ('<section><h2>Sample predictions</h2>'
            '<p class="empty">No thumbnails: no image was predicted.</p></section>')
  shown = thumbnails[:MAX_THUMBNAILS]
  note = f'{len(shown)} predicted images with their tags'
  if len(thumbnails) > len(shown):
    note += f' (the first {len(shown)} of {len(thumbnails):,} given)'
  figures = ''.join(_thumbnail_figure(t) for t in shown)
  return (f'<section><h2>Sample predictions</h2><p class="note">{note}.</p>'
          f'<div class="grid">{figures}</div></section>')


def _thumbnail_figure(thumbnail: dict) -> str:
  name = str(thumbnail.get('image_name', ''))
  src = str(thumbnail.get('src') or '')
  if _IMAGE_DATA_URI.fullmatch(src):
    image = f'<img src="{src}" alt="{_esc(name)}">'
  else:
    image = '<div class="missing" role="img" aria-label="no thumbnail"></div>'
  tags = _tag_spans(thumbnail.get('tags') or [])
  return (f'<figure>{image}<figcaption><div class="name" title="{_esc(name)}">{_esc(name)}</div>'
          f'<div class="tags">{tags}</div></figcaption></figure>')


def _tag_spans(tags: Iterable[Any]) -> str:
  spans = ''.join(
      f'<span class="tag{" weather" if str(tag) in _WEATHER else ""}">{_esc(tag)}</span>'
      for tag in tags)
  return spans or '<span class="tag none">no tags</span>'
