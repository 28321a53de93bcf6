"""Label parsing: both formats, every refusal with its reason code, the real files agree."""
import pytest

from beam_jobs import labels
from beam_jobs.labels import CsvFormat, LabelRow, parse_label_line
from model import schema
from model.errors import InputRefused, Reason

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


def test_real_label_files_give_identical_vectors(planet_dir):
  kaggle, kaggle_refused = labels.parse_label_file(str(planet_dir / 'train_v2.csv'))
  tutorial, tutorial_refused = labels.parse_label_file(str(planet_dir / 'KagglePlanetMCML.csv'))
  assert kaggle_refused == [] and tutorial_refused == []
  assert len(kaggle) == len(tutorial) == 40479
  assert kaggle == tutorial
  without_weather = [name for name, row in kaggle.items() if not row.has_weather]
  assert without_weather == ['train_24448']
