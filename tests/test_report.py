"""report.html: pure rendering tests, then the page opened in headless Chromium like a person."""
import base64
import html.parser
import io
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from beam_jobs import make_sample
from beam_jobs.predict.report_html import render_report
from beam_jobs.predict.thumbnails import MAX_THUMBNAILS, make_thumbnail
from model import metrics, schema

HOSTILE_NAME = '<script>alert(1)</script>'
HOSTILE_ATTRIBUTE = '"><img src=x onerror=alert(2)>'
CHROMIUM_NAMES = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')
# Tall enough for the whole page with 36 thumbnails at 1280 wide (it is about 3,600 px).
WINDOW = (1280, 3800)


class _Page(html.parser.HTMLParser):
  """The parsed page: its start tags with attributes, and its text as a browser would show it."""

  def __init__(self, page: str):
    super().__init__(convert_charrefs=True)
    self.source = page
    self.tags: list[tuple[str, dict]] = []
    self.texts: list[str] = []
    self._in_style = False
    self.feed(page)
    self.close()

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))
    self._in_style = tag == 'style'

  def handle_endtag(self, tag):
    self._in_style = False

  def handle_data(self, data):
    if not self._in_style:
      self.texts.append(data)

  @property
  def text(self) -> str:
    return ' '.join(self.texts)

  def named(self, tag: str) -> list[dict]:
    return [attrs for t, attrs in self.tags if t == tag]


def _chip_pixels(index: int, tags: list[str]) -> np.ndarray:
  return np.asarray(make_sample.draw_chip(tags, np.random.default_rng([5, index])))


def _label_matrix(rows):
  return np.array([[label in row for label in schema.ALL_LABELS] for row in rows])


def _realistic_inputs(count: int, thumbnail_count: int, with_thumbnail_pixels: bool = True):
  """A summary as the prediction job writes it, from sampled truths and perturbed predictions."""
  rng = np.random.default_rng(11)
  truths = [make_sample.sample_tags(rng) for _ in range(count)]
  predictions = []
  for tags in truths:
    flipped = {g for g in schema.GROUND_LABELS if rng.random() < 0.04}
    predicted = set(tags) ^ flipped
    if rng.random() < 0.1:   # a wrong weather now and then, so the confusion matrix is not diagonal
      predicted = (predicted - set(schema.WEATHER_LABELS)) | {rng.choice(schema.WEATHER_LABELS)}
    predictions.append([label for label in schema.ALL_LABELS if label in predicted])
  y_true, y_pred = _label_matrix(truths), _label_matrix(predictions)
  summary = {
      'model_name': 'PlanetModel', 'model_versions': ['3'], 'backend': 'grpc',
      'started_at': '2026-11-24T15:00:00Z', 'elapsed_seconds': 12.5,
      'images_per_second': count / 12.5,
      'counts': {'images_matched': count + 10, 'predictions': count, 'dead_letters': 10},
      'dead_letter_reasons': {'NOT_AN_IMAGE': 4, 'TRUNCATED_IMAGE': 6},
      'dead_letter_examples': [
          {'image_name': HOSTILE_NAME, 'path': f'/in/{HOSTILE_NAME}.jpg', 'reason': 'NOT_AN_IMAGE',
           'message': 'cannot identify image file <b>not bold</b>'},
          {'image_name': 'test_17', 'path': 'gs://bucket/in/test_17.jpg',
           'reason': 'TRUNCATED_IMAGE',
           'message': 'image file is truncated (12 bytes not processed)'},
      ],
      'predicted_label_counts': dict(zip(schema.ALL_LABELS, y_pred.sum(axis=0).tolist())),
      'evaluation': {
          'labelled_images': count, 'unlabelled_images': 0, 'f2': metrics.mean_f2(y_true, y_pred),
          'per_label': metrics.per_label_scores(y_true, y_pred),
          'weather_confusion': metrics.weather_confusion(y_true[:, :schema.NUM_WEATHER],
                                                         y_pred[:, :schema.NUM_WEATHER]),
          'weather_labels': list(schema.WEATHER_LABELS),
      },
  }
  thumbnails = []
  for i in range(thumbnail_count):
    src = (make_thumbnail(_chip_pixels(i, truths[i])) if with_thumbnail_pixels
           else 'data:image/jpeg;base64,')   # no image: a placeholder, fast enough for pure tests
    name = {3: HOSTILE_NAME, 4: HOSTILE_ATTRIBUTE}.get(i, f'test_{i}')
    thumbnails.append({'image_name': name, 'tags': predictions[i], 'src': src})
  return summary, thumbnails


def _empty_summary() -> dict:
  return {'model_name': 'PlanetModel', 'model_versions': ['1'], 'backend': 'in_process',
          'started_at': '2026-11-24T15:00:00Z', 'elapsed_seconds': 0.4, 'images_per_second': 0.0,
          'counts': {'images_matched': 0, 'predictions': 0, 'dead_letters': 0},
          'dead_letter_reasons': {}, 'predicted_label_counts': {}}


# --- make_thumbnail ----------------------------------------------------------------------------

def test_make_thumbnail_is_a_small_jpeg_data_uri():
  src = make_thumbnail(_chip_pixels(0, ['clear', 'primary', 'road']))
  prefix = 'data:image/jpeg;base64,'
  assert src.startswith(prefix)
  image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)))
  assert image.format == 'JPEG' and image.mode == 'RGB' and image.size == (96, 96)
  assert len(src) < 12_000   # a few dozen of these keep the page well under a megabyte
  wide = make_thumbnail(np.zeros((64, 256, 3), np.uint8), side=64)
  assert Image.open(io.BytesIO(base64.b64decode(wide[len(prefix):]))).size == (64, 16)


@pytest.mark.parametrize('pixels', [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8),
                                    np.zeros((8, 8, 4), np.uint8), np.zeros((0, 8, 3), np.uint8)])
def test_make_thumbnail_refuses_what_is_not_uint8_rgb(pixels):
  with pytest.raises(ValueError, match='uint8'):
    make_thumbnail(pixels)


# --- render_report: escaping and self-containment ---------------------------------------------

def test_strings_from_the_data_render_as_text_never_as_markup():
  summary, thumbnails = _realistic_inputs(count=40, thumbnail_count=6, with_thumbnail_pixels=False)
  summary['model_name'] = '<i>Planet</i>'
  summary['dead_letter_reasons'] = {'<u>ODD</u>': 1}
  thumbnails[0]['tags'] = ['clear', '<marquee>x</marquee>']
  page = render_report(summary, thumbnails)
  parsed = _Page(page)

  assert not parsed.named('script') and not parsed.named('i') and not parsed.named('u')
  assert not parsed.named('b') and not parsed.named('marquee')
  assert all('onerror' not in attrs for _, attrs in parsed.tags)
  for hostile in (HOSTILE_NAME, HOSTILE_ATTRIBUTE, '<i>Planet</i>', '<u>ODD</u>',
                  '<marquee>x</marquee>', '<b>not bold</b>'):
    assert hostile in parsed.text, hostile     # shown to the reader, character for character
    assert hostile not in page, hostile        # never as raw markup
  assert '&lt;script&gt;alert(1)&lt;/script&gt;' in page


def test_the_page_is_self_contained():
  summary, thumbnails = _realistic_inputs(count=40, thumbnail_count=4)
  thumbnails += [
      {'image_name': 'remote', 'tags': ['clear'], 'src': 'https://example.com/x.jpg'},
      {'image_name': 'js', 'tags': ['clear'], 'src': 'javascript:alert(1)'},
      {'image_name': 'breakout', 'tags': ['clear'],
       'src': 'data:image/jpeg;base64,AAAA" onload="x'},
  ]
  page = render_report(summary, thumbnails)
  parsed = _Page(page)

  for marker in ('http://', 'https://', '<link', '<script', 'url(', '@import', 'javascript:'):
    assert marker not in page, marker
  sources = [attrs['src'] for attrs in parsed.named('img')]
  assert len(sources) == 4 and all(s.startswith('data:image/jpeg;base64,') for s in sources)
  assert len(parsed.named('figure')) == 7     # refused sources become placeholders, not gaps
  policy = next(a for a in parsed.named('meta') if a.get('http-equiv') == 'Content-Security-Policy')
  assert "default-src 'none'" in policy['content'] and 'script-src' not in policy['content']


# --- render_report: content ------------------------------------------------------------------

def test_title_counts_and_evaluation_are_shown():
  summary, thumbnails = _realistic_inputs(count=60, thumbnail_count=3, with_thumbnail_pixels=False)
  summary['evaluation']['f2'] = 0.87
  parsed = _Page(render_report(summary, thumbnails))
  text = parsed.text

  assert 'PlanetModel version 3' in text and '2026-11-24 at 15:00:00 UTC' in text
  assert 'TF Serving over gRPC' in text
  cards = re.findall(r'<div class="value">([^<]*)</div><div class="name">([^<]*)</div>',
                     parsed.source)
  assert cards == [('70', 'Images matched'), ('60', 'Predicted'), ('10', 'Dead-lettered'),
                   ('12.5 s', 'Elapsed'), ('4.8', 'Images / second')]
  assert '0.870' in text and 'Kaggle F2' in text
  per_label_rows = [r for r in _table_rows(parsed, 'per-label')]
  assert [r[0] for r in per_label_rows] == list(schema.ALL_LABELS)
  confusion = summary['evaluation']['weather_confusion']
  assert _table_rows(parsed, 'confusion') == [
      [label] + [f'{v:,}' for v in row] + [f'{sum(row):,}', f'{100 * row[i] / sum(row):.1f}%']
      for i, (label, row) in enumerate(zip(schema.WEATHER_LABELS, confusion))]
  assert 'NOT_AN_IMAGE' in text and 'TRUNCATED_IMAGE' in text and 'test_17' in text


def _table_rows(parsed: _Page, table_class: str) -> list[list[str]]:
  """The body rows of the table with that class, as the cell texts, re-parsed from the page."""
  class Rows(html.parser.HTMLParser):
    def __init__(self):
      super().__init__()
      self.rows, self.depth, self.in_body, self.cell = [], 0, False, None

    def handle_starttag(self, tag, attrs):
      if tag == 'table' and table_class in (dict(attrs).get('class') or '').split():
        self.depth = 1
      elif self.depth and tag == 'tbody':
        self.in_body = True
      elif self.in_body and tag == 'tr':
        self.rows.append([])
      elif self.in_body and tag in ('td', 'th'):
        self.cell = ''

    def handle_endtag(self, tag):
      if self.in_body and tag in ('td', 'th'):
        self.rows[-1].append(self.cell.strip())
        self.cell = None
      elif tag == 'table' and self.depth:
        self.depth, self.in_body = 0, False

    def handle_data(self, data):
      if self.cell is not None:
        self.cell += data
  rows = Rows()
  rows.feed(parsed.source)
  return rows.rows


def test_chart_has_all_17_labels_in_schema_order_even_when_counts_are_missing():
  summary = _empty_summary()
  summary['counts']['predictions'] = summary['counts']['images_matched'] = 5
  summary['predicted_label_counts'] = {'water': 5, 'clear': 3, 'not_a_label': 9}
  page = render_report(summary, [])
  chart = page[page.index('<svg'):page.index('</svg>')]
  chart_text = _Page(chart)
  assert [t for t in chart_text.texts if t in schema.ALL_LABELS] == list(schema.ALL_LABELS)
  assert 'water: 5  ·  100.0%' in chart_text.text and 'clear: 3  ·  60.0%' in chart_text.text
  assert 'haze: 0' in chart_text.text and 'not_a_label' not in page
  assert chart.count('class="weather"') == 4 and chart.count('class="ground"') == 13


@pytest.mark.parametrize('summary', [_empty_summary(), {}],
                         ids=['zero_predictions', 'empty_summary'])
def test_zero_predictions_no_labels_no_dead_letters(summary):
  parsed = _Page(render_report(summary, []))
  text = parsed.text
  assert 'No image was predicted' in text
  assert 'No labels were given' in text
  assert 'None: every matched image was predicted' in text
  assert 'No thumbnails' in text
  assert [t for t in parsed.texts if t in schema.ALL_LABELS] == list(schema.ALL_LABELS)
  assert not re.search(r'\b(nan|inf|none%)\b', text.lower())


def test_dead_letters_without_labels():
  summary = _empty_summary()
  summary['counts'] = {'images_matched': 3, 'predictions': 0, 'dead_letters': 3}
  summary['dead_letter_reasons'] = {'NOT_AN_IMAGE': 1, 'EMPTY_FILE': 2}
  summary['dead_letter_examples'] = [
      {'image_name': f'bad_{i}', 'path': f'/in/bad_{i}.jpg', 'reason': 'EMPTY_FILE',
       'message': 'x' * 5000} for i in range(30)]
  parsed = _Page(render_report(summary, []))
  assert _table_rows(parsed, 'reasons') == [['EMPTY_FILE', '2', '66.7%'],
                                            ['NOT_AN_IMAGE', '1', '33.3%']]   # largest first
  examples = _table_rows(parsed, 'examples')
  assert len(examples) == 10 and examples[0][0] == 'bad_0/in/bad_0.jpg'
  assert max(len(row[2]) for row in examples) < 500   # long messages are cut
  assert 'Counts do not add up' not in parsed.text


def test_counts_that_do_not_add_up_are_flagged_and_version_changes_noted():
  summary = _empty_summary()
  summary['counts'] = {'images_matched': 10, 'predictions': 7, 'dead_letters': 2}
  summary['model_versions'] = ['2', '3']
  text = _Page(render_report(summary, [])).text
  assert 'Counts do not add up' in text and '7 predicted + 2 dead-lettered = 9' in text
  assert 'PlanetModel versions 2, 3' in text and 'version changed during the run' in text


def test_thumbnails_are_capped_and_rendering_is_deterministic():
  given = MAX_THUMBNAILS + 12
  summary, thumbnails = _realistic_inputs(count=given, thumbnail_count=given,
                                          with_thumbnail_pixels=False)
  page = render_report(summary, thumbnails)
  assert len(_Page(page).named('figure')) == MAX_THUMBNAILS
  assert f'the first {MAX_THUMBNAILS} of {given} given' in page
  assert render_report(summary, thumbnails) == page


# --- In headless Chromium ----------------------------------------------------------------------

@pytest.fixture(scope='module')
def chromium() -> str:
  """The Chromium binary. Missing is a failure, not a skip: this is the only test of the page."""
  for name in CHROMIUM_NAMES:
    path = shutil.which(name)
    if path:
      return path
  pytest.fail('Chromium is not installed, so report.html cannot be checked in a browser. '
              'Run ./run_local.sh test (which installs it), or: '
              'sudo apt-get update && sudo apt-get install -y chromium')


def _open_in_chromium(binary: str, page: str,
                      tmp_path: pathlib.Path) -> tuple[str, str, pathlib.Path]:
  """Loads the page from a file as a person would; returns (DOM, log lines, screenshot path)."""
  page_path = tmp_path / schema.REPORT_FILE
  page_path.write_text(page, encoding='utf-8')
  screenshot = tmp_path / 'screenshot.png'
  command = [
      binary, '--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
      '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--hide-scrollbars',
      f'--user-data-dir={tmp_path / "profile"}', '--enable-logging=stderr', '--v=0',
      f'--window-size={WINDOW[0]},{WINDOW[1]}', f'--screenshot={screenshot}', '--dump-dom',
      page_path.as_uri()]
  done = subprocess.run(command, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr[-3000:]
  assert screenshot.is_file(), done.stderr[-3000:]
  return done.stdout, done.stderr, screenshot


def _console_lines(log: str) -> list[str]:
  # With --enable-logging every console message, error or not, is an INFO:CONSOLE line; the page
  # runs no script, so any such line is a problem (a blocked load, a CSP violation, a JS error).
  return [line for line in log.splitlines() if ':CONSOLE' in line or 'Uncaught' in line]


def _colour_codes(rgb: np.ndarray) -> np.ndarray:
  """One int per pixel (0xRRGGBB): counting colours on these is far faster than on RGB rows."""
  rgb = rgb.astype(np.int32)
  return rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]


def _distinct_colours_per_tile(rgb: np.ndarray, tile: int = 24) -> np.ndarray:
  codes = _colour_codes(rgb)
  rows, cols = codes.shape[0] // tile, codes.shape[1] // tile
  tiles = codes[:rows * tile, :cols * tile].reshape(rows, tile, cols, tile).transpose(0, 2, 1, 3)
  tiles = np.sort(tiles.reshape(rows, cols, tile * tile), axis=2)
  return (np.diff(tiles, axis=2) != 0).sum(axis=2) + 1


def _longest_run(rgb: np.ndarray, colour: tuple[int, int, int]) -> int:
  """The longest horizontal run of exactly this colour: long ones are chart bars, not tags."""
  mask = np.all(rgb == np.array(colour, np.uint8), axis=2).astype(np.int8)
  edges = np.diff(np.pad(mask, ((0, 0), (1, 1))), axis=1)
  starts, ends = np.nonzero(edges == 1), np.nonzero(edges == -1)
  return int((ends[1] - starts[1]).max()) if len(starts[1]) else 0


@pytest.mark.slow
def test_report_opens_cleanly_in_chromium_and_shows_charts_and_thumbnails(chromium, tmp_path):
  summary, thumbnails = _realistic_inputs(count=300, thumbnail_count=36)
  dom, log, screenshot = _open_in_chromium(chromium, render_report(summary, thumbnails), tmp_path)

  assert _console_lines(log) == []
  # The browser built the hostile names as text nodes: no script element, no injected image.
  parsed = _Page(dom)
  assert not parsed.named('script') and all('onerror' not in a for _, a in parsed.tags)
  assert HOSTILE_NAME in parsed.text and HOSTILE_ATTRIBUTE in parsed.text
  assert len(parsed.named('figure')) == 36
  assert all(a['src'].startswith('data:image/jpeg;base64,') for a in parsed.named('img'))

  rgb = np.asarray(Image.open(screenshot).convert('RGB'))
  assert rgb.shape[:2] == (WINDOW[1], WINDOW[0])
  _, pixels_per_colour = np.unique(_colour_codes(rgb), return_counts=True)
  assert pixels_per_colour.max() / pixels_per_colour.sum() < 0.8, 'the page is mostly one colour'
  assert len(pixels_per_colour) > 5_000, 'too few colours for charts and photos'
  # The label chart: bars in the weather and ground colours, far longer than any tag pill.
  assert _longest_run(rgb, (0x3b, 0x78, 0xb8)) > 250, 'no weather bar in the chart'
  assert _longest_run(rgb, (0x3c, 0x8a, 0x4c)) > 250, 'no ground bar in the chart'
  # The thumbnails: photo-like tiles (hundreds of colours in 24x24 px); text and charts have few.
  photo_tiles = int((_distinct_colours_per_tile(rgb) > 150).sum())
  assert photo_tiles > 5 * 36, f'only {photo_tiles} photo-like tiles: thumbnails did not render'


@pytest.mark.slow
def test_the_browser_console_check_sees_a_blocked_remote_image(chromium, tmp_path):
  """The check above can fail: a remote image slipped into the page is refused and logged."""
  summary, thumbnails = _realistic_inputs(count=20, thumbnail_count=1)
  page = render_report(summary, thumbnails)
  page = page.replace(thumbnails[0]['src'], 'http://127.0.0.1:9/remote.jpg')   # loopback only
  _, log, _ = _open_in_chromium(chromium, page, tmp_path)
  assert any('Content Security Policy' in line for line in _console_lines(log)), log[-3000:]
