"""Label parsing: both formats, every refusal with its reason code, CSV records that span lines,
bounded reads, and the real files agree."""
import tracemalloc

import pytest

from beam_jobs.common import labels
from beam_jobs.common.labels import CsvFormat, LabelRow, parse_label_line
from model import schema
from model.errors import InputRefused, Reason
from tests.conftest import is_real

KAGGLE, TUTORIAL = CsvFormat.KAGGLE, CsvFormat.TUTORIAL


def _reason(line, fmt=KAGGLE) -> Reason:
  with pytest.raises(InputRefused) as info:
    parse_label_line(line, fmt)
  return info.value.reason


def test_kaggle_row():
  row = parse_label_line('train_1,agriculture clear primary water', KAGGLE)
  assert row.image_name == 'train_1'
  assert row.weather == (1.0, 0.0, 0.0, 0.0)
  assert [g for g, v in zip(schema.GROUND_LABELS, row.ground) if v] == [
      'agriculture', 'primary', 'water']
  assert row.tags == ['clear', 'agriculture', 'primary', 'water']


def test_tutorial_row_equals_kaggle_row():
  tutorial = parse_label_line(
      'train_1,"[1, 0, 0, 0]","[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]"', TUTORIAL)
  assert tutorial == parse_label_line('train_1,agriculture clear primary water', KAGGLE)


def test_row_without_weather_is_kept_with_zero_vector():
  row = parse_label_line('train_24448,water', KAGGLE)
  assert row.weather == (0.0,) * 4 and not row.has_weather


@pytest.mark.parametrize('header,fmt', [
    ('image_name,tags', KAGGLE), ('\ufeffimage_name,tags\r\n', KAGGLE),
    (b'\xef\xbb\xbfimage_name,tags\r\n', KAGGLE),
    ('image_name,weather_labels,ground_labels', TUTORIAL)])
def test_detects_format(header, fmt):
  assert labels.detect_format(header) is fmt


def test_unknown_header_is_a_configuration_error():
  with pytest.raises(ValueError, match='image_name,tags'):
    labels.detect_format('name,labels')


def test_bom_and_crlf_file(tmp_path):
  path = tmp_path / 'labels.csv'
  path.write_bytes(b'\xef\xbb\xbfimage_name,tags\r\ntrain_0,haze primary\r\n\r\ntrain_1,cloudy\r\n')
  rows, refused = labels.parse_label_file(str(path))
  assert refused == []
  assert rows['train_0'].tags == ['haze', 'primary'] and rows['train_1'].tags == ['cloudy']


@pytest.mark.parametrize('line,reason', [
    ('train_0,clear primary sunshine', Reason.UNKNOWN_TAG),
    ('train_0,', Reason.EMPTY_TAGS),
    ('train_0,   ', Reason.EMPTY_TAGS),
    ('train_0,clear haze primary', Reason.MULTIPLE_WEATHER),
    ('train_0', Reason.MALFORMED_ROW),
    ('train_0,clear,primary', Reason.MALFORMED_ROW),
    ('train_0,"clear', Reason.MALFORMED_ROW),
    (b'train_0,clear \xff\xfe primary', Reason.MALFORMED_ROW),
    ('train_0,' + 'primary ' * 200_000, Reason.MALFORMED_ROW),
    ('../../etc/passwd,clear', Reason.BAD_IMAGE_NAME),
    ('..,clear', Reason.BAD_IMAGE_NAME),
    ('/etc/passwd,clear', Reason.BAD_IMAGE_NAME),
    ('sub/train_0,clear', Reason.BAD_IMAGE_NAME),
    ('sub\\train_0,clear', Reason.BAD_IMAGE_NAME),
    ('C:train_0,clear', Reason.BAD_IMAGE_NAME),
    ('gs://bucket/train_0,clear', Reason.BAD_IMAGE_NAME),
    ('file:train_0,clear', Reason.BAD_IMAGE_NAME),
    ('.hidden,clear', Reason.BAD_IMAGE_NAME),
    ('train\x00_0,clear', Reason.BAD_IMAGE_NAME),
    (',clear', Reason.BAD_IMAGE_NAME),
])
def test_kaggle_refusals(line, reason):
  assert _reason(line) is reason


@pytest.mark.parametrize('line,reason', [
    ('train_0,"[1, 1, 0, 0]","[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]"', Reason.MULTIPLE_WEATHER),
    ('train_0,"[0, 0, 0, 0]","[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]"', Reason.EMPTY_TAGS),
    ('train_0,"[1, 0, 0]","[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]"', Reason.MALFORMED_ROW),
    ('train_0,"[1, 0, 0, 2]","[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]"', Reason.MALFORMED_ROW),
    ('train_0,"1 0 0 0","[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]"', Reason.MALFORMED_ROW),
    ('../x,"[1, 0, 0, 0]","[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]"', Reason.BAD_IMAGE_NAME),
])
def test_tutorial_refusals(line, reason):
  assert _reason(line, TUTORIAL) is reason


def test_duplicates_identical_keep_first():
  row = LabelRow('a', (1.0, 0.0, 0.0, 0.0), (0.0,) * 13)
  kept, refused = labels.resolve_duplicates([(9, row), (3, row), (5, row)])
  assert kept == row
  assert [n for n, _ in refused] == [5, 9]


def test_duplicates_conflicting_all_refused():
  a = LabelRow('a', (1.0, 0.0, 0.0, 0.0), (0.0,) * 13)
  b = LabelRow('a', (0.0, 1.0, 0.0, 0.0), (0.0,) * 13)
  kept, refused = labels.resolve_duplicates([(3, a), (4, a), (7, b)])
  assert kept is None
  assert [n for n, _ in refused] == [3, 4, 7]


def test_both_label_files_give_identical_vectors(planet_dir):
  kaggle, kaggle_refused = labels.parse_label_file(str(planet_dir / 'train_v2.csv'))
  tutorial, tutorial_refused = labels.parse_label_file(str(planet_dir / 'KagglePlanetMCML.csv'))
  assert kaggle_refused == [] and tutorial_refused == []
  assert len(kaggle) == len(tutorial) == (40479 if is_real(planet_dir) else 7)
  assert kaggle == tutorial
  without_weather = [name for name, row in kaggle.items() if not row.has_weather]
  assert without_weather == ['train_24448']


def _write(tmp_path, data: bytes) -> str:
  path = tmp_path / 'labels.csv'
  path.write_bytes(data)
  return str(path)


def _peak_bytes(call):
  """Runs `call`; returns what it returned or raised, and the peak of memory it allocated."""
  tracemalloc.start()
  try:
    try:
      result = call()
    except Exception as e:  # pylint: disable=broad-except
      result = e
    return result, tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


# A chunk of 1 byte puts every CR at the end of what was read, where a CRLF must be read on.
@pytest.mark.parametrize('chunk_bytes', [1, None], ids=['1-byte-reads', 'default-reads'])
@pytest.mark.parametrize('eol', [b'\n', b'\r\n', b'\r'], ids=['LF', 'CRLF', 'CR'])
def test_quoted_line_break_is_one_record(tmp_path, monkeypatch, eol, chunk_bytes):
  if chunk_bytes:
    monkeypatch.setattr(labels, '_READ_CHUNK_BYTES', chunk_bytes)
  path = _write(tmp_path, eol.join([
      b'image_name,tags', b'train_0,"agriculture', b'clear"', b'', b'train_1,"haze ""x"""',
      b'train_2,"primary', b'', b'water"', b'train_3,cl\xffear', b'train_4,cloudy']))
  _, records = labels.read_label_lines(path)
  assert [n for n, _ in records] == [2, 5, 6, 9, 10]
  rows, refused = labels.parse_label_file(path)
  assert rows['train_0'].tags == ['clear', 'agriculture']
  assert rows['train_2'].tags == ['primary', 'water'] and rows['train_4'].tags == ['cloudy']
  assert [(n, e.reason) for n, e in refused] == [
      (5, Reason.UNKNOWN_TAG), (9, Reason.MALFORMED_ROW)]


def test_one_pass_counts_the_records_and_hashes_every_byte(tmp_path, monkeypatch):
  import hashlib
  monkeypatch.setattr(labels, '_READ_CHUNK_BYTES', 7)
  # An over-long record and an unclosed quote at the end: bytes the records leave unread.
  data = (b'image_name,tags\ntrain_0,haze\n' + b'x' * (labels.MAX_LINE_CHARS + 50)
          + b'\ntrain_1,"clear\n\n\n')
  path = _write(tmp_path, data)
  digest = hashlib.sha256()
  _, records = labels.read_label_lines(path, digest)
  assert len(list(records)) == 3
  assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_quoted_line_break_in_a_tutorial_record(tmp_path):
  path = _write(tmp_path, b'image_name,weather_labels,ground_labels\r\n'
                b'train_1,"[1, 0,\r\n 0, 0]","[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]"\r\n'
                b'train_2,"[0, 1, 0, 0]","[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]"\r\n')
  _, records = labels.read_label_lines(path)
  assert [n for n, _ in records] == [2, 4]
  rows, refused = labels.parse_label_file(path)
  assert refused == []
  assert rows['train_1'] == parse_label_line('train_1,agriculture clear primary water', KAGGLE)


def test_unclosed_quote_at_the_end_is_refused_alone(tmp_path):
  path = _write(tmp_path, b'image_name,tags\ntrain_0,haze\ntrain_1,"clear\ntrain_2,cloudy\n')
  rows, refused = labels.parse_label_file(path)
  assert sorted(rows) == ['train_0', 'train_2']
  assert [(n, e.reason) for n, e in refused] == [(3, Reason.MALFORMED_ROW)]
  assert 'never closed' in refused[0][1].message


def test_runaway_quote_costs_one_row_and_later_records_are_read(tmp_path):
  # The rows after the stray quote run past MAX_LINE_CHARS before the next quoted record.
  good = [b'train_%d,clear primary' % i for i in range(2, 2000)]
  path = _write(tmp_path, b'\n'.join(
      [b'image_name,tags', b'train_1,"clear'] + good + [b'train_9999,"haze', b'water"', b'']))
  _, records = labels.read_label_lines(path)
  assert [n for n, _ in records] == list(range(2, len(good) + 4))
  rows, refused = labels.parse_label_file(path)
  assert [(n, e.reason) for n, e in refused] == [(2, Reason.MALFORMED_ROW)]
  assert len(rows) == len(good) + 1 and rows['train_9999'].tags == ['haze', 'water']


def test_huge_header_without_a_line_break_is_refused_briefly(tmp_path):
  path = _write(tmp_path, b'x' * 10_000_000)
  error, peak = _peak_bytes(lambda: labels.read_label_lines(path))
  assert isinstance(error, ValueError) and not isinstance(error, InputRefused)
  assert len(str(error)) < 400 and '\n' not in str(error) and 'x' * 101 not in str(error)
  assert peak < 4_000_000


def test_huge_data_line_is_one_malformed_row(tmp_path):
  path = _write(tmp_path, b'image_name,tags\r\ntrain_0,' + b'primary ' * 1_250_000 +
                b'\r\ntrain_1,"haze\r\nwater"\r\ntrain_2,cloudy')
  (rows, refused), peak = _peak_bytes(lambda: labels.parse_label_file(path))
  assert [(n, e.reason) for n, e in refused] == [(2, Reason.MALFORMED_ROW)]
  assert len(str(refused[0][1])) < 400
  assert sorted(rows) == ['train_1', 'train_2']
  assert peak < 4_000_000


def test_unknown_header_message_quotes_little_of_it():
  with pytest.raises(ValueError, match='image_name,tags') as info:
    labels.detect_format('name,' * 10_000)
  assert len(str(info.value)) < 400


@pytest.mark.parametrize('data,expected', [
    (b'image_name,tags', False),
    (b'image_name,tags\n', False),
    (b'\xef\xbb\xbfimage_name,tags\r\n\r\n  \r\n\n', False),
    (b'image_name,weather_labels,ground_labels\n\n', False),
    (b'image_name,tags\n\ntrain_0,clear', True),
    (b'image_name,tags\r\n\r\nnot a row\r\n', True),   # refused by the job, but it is a row
], ids=['header', 'header-LF', 'BOM-blank-lines', 'tutorial-blank-line', 'one-row', 'bad-row'])
def test_has_data_rows(tmp_path, data, expected):
  assert labels.has_data_rows(_write(tmp_path, data)) is expected


def test_has_data_rows_refuses_a_bad_header(tmp_path):
  with pytest.raises(ValueError, match='image_name,tags'):
    labels.has_data_rows(_write(tmp_path, b'name,labels\ntrain_0,clear\n'))


def test_label_bits_carry_every_label_and_rebuild_the_same_row():
  rows = [LabelRow('a', (0.0, 1.0, 0.0, 0.0), tuple(float(i % 3 == 0) for i in range(13))),
          LabelRow('b', (0.0,) * 4, (0.0,) * 13),
          LabelRow('c', (0.0, 0.0, 0.0, 1.0), (1.0,) * 13)]
  assert len({row.label_bits for row in rows}) == 3
  for row in rows:
    assert LabelRow.from_label_bits(row.image_name, row.label_bits) == row
