"""Names that find no partner: CSV rows without their images (what they cost, how progress shows
them), names written in another Unicode normalization form, extensions in another case. Both
jobs, run as a user runs them."""
import json
import pathlib
import shutil
import unicodedata

import pytest

from beam_jobs.common.name_forms import OtherForms, mismatch_text
from beam_jobs.make_sample import make_sample
from beam_jobs.preprocess.rules import join_one_bucket
from model.errors import Reason
from tests.conftest import read_jsonl
from tests.test_reliability_serving import peak_rss_of
from tests.test_trusted_outputs import _command

COMPOSED = 'caf\u00e9_field'      # NFC: what a spreadsheet writes
DECOMPOSED = 'cafe\u0301_field'   # NFD: what macOS and some archivers write
# A CSV row without its image may cost at most this much memory in preprocess: its name, line
# and label bits, packed, in the join's grouping until the join ends (measured ~180 bytes).
BYTES_PER_ABSENT_ROW = 400
ABSENT_ROWS = 150_000


@pytest.fixture(scope='module')
def sample(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp('unmatched') / 'sample'
  make_sample(str(root), count=8, seed=26)
  return root


def _tags(sample: pathlib.Path) -> list[str]:
  return sample.joinpath('train_v2.csv').read_text().splitlines()[1:]


def test_the_two_forms_are_told_apart_and_found():
  assert COMPOSED != DECOMPOSED and unicodedata.normalize('NFC', DECOMPOSED) == COMPOSED
  forms = OtherForms([COMPOSED, 'plain'])
  assert forms.partner(DECOMPOSED) == COMPOSED and forms.partner(COMPOSED) is None
  assert OtherForms([DECOMPOSED]).partner(COMPOSED) == DECOMPOSED
  assert forms.partner('plain') is None and forms.partner('other') is None
  why = mismatch_text(DECOMPOSED, COMPOSED)
  assert 'NFC (composed characters)' in why and 'NFD (decomposed characters)' in why
  assert 'rename the file, or fix the name in the CSV' in why


def test_the_join_names_the_other_form_on_both_sides():
  joined = list(join_one_bucket([(COMPOSED, 2, 0b1)], [], [(DECOMPOSED, f'/i/{DECOMPOSED}.jpg')],
                                lambda name: f'/i/{name}.jpg'))
  records = {r['reason']: r for _, refused in joined for r in refused}
  assert [image for image, _ in joined] == [None, None]        # never matched: two file names
  missing = records[Reason.MISSING_IMAGE.value]
  assert missing['image_name'] == COMPOSED and f'/i/{DECOMPOSED}.jpg' in missing['message']
  assert 'NFD (decomposed characters)' in missing['message']
  unused = records[Reason.IMAGE_WITHOUT_ROW.value]
  assert unused['image_name'] == DECOMPOSED and repr(COMPOSED) in unused['message']


def test_preprocess_matches_any_extension_case_and_explains_another_form(sample, tmp_path):
  images = tmp_path / 'images'
  shutil.copytree(sample / 'train-jpg', images)
  rows = _tags(sample)
  (images / 'train_0.jpg').rename(images / 'train_0.JPG')
  (images / 'train_1.jpg').rename(images / f'{DECOMPOSED}.jpg')
  rows[1] = COMPOSED + rows[1][rows[1].index(','):]
  (tmp_path / 'labels.csv').write_text('image_name,tags\n' + '\n'.join(rows) + '\n')
  done = _command('beam_jobs.preprocess', [
      '--labels_csv', str(tmp_path / 'labels.csv'), '--images_dir', str(images),
      '--output_dir', str(tmp_path / 'out'), '--image_size', '32', '--max_bad_fraction', '0.5'])
  assert done.returncode == 0, done.stderr[-3000:]
  manifest = json.loads((tmp_path / 'out' / 'manifest.json').read_text())
  assert sum(manifest['counts']['examples'].values()) == 7          # train_0.JPG is one of them
  records = {r['reason']: r for r in read_jsonl(tmp_path / 'out' / 'dead_letters' / '*.jsonl')}
  assert sorted(records) == [Reason.IMAGE_WITHOUT_ROW.value, Reason.MISSING_IMAGE.value]
  assert f'{DECOMPOSED}.jpg' in records[Reason.MISSING_IMAGE.value]['message']
  assert 'NFD (decomposed characters)' in records[Reason.MISSING_IMAGE.value]['message']
  assert repr(COMPOSED) in records[Reason.IMAGE_WITHOUT_ROW.value]['message']


@pytest.mark.slow
def test_predict_says_which_unscored_images_the_csv_writes_in_another_form(sample, export_base,
                                                                         tmp_path):
  images = tmp_path / 'images'
  shutil.copytree(sample / 'train-jpg', images)
  (images / 'train_2.jpg').rename(images / f'{DECOMPOSED}.jpg')
  (images / 'train_3.jpg').rename(images / 'train_3.JPG')
  rows = _tags(sample)
  rows[2] = COMPOSED + rows[2][rows[2].index(','):]
  (tmp_path / 'labels.csv').write_text('image_name,tags\n' + '\n'.join(rows) + '\n')
  done = _command('beam_jobs.predict', [
      '--input', str(images), '--output_dir', str(tmp_path / 'out'),
      '--model_dir', str(export_base / 'PlanetModel'), '--labels_csv', str(tmp_path / 'labels.csv')])
  assert done.returncode == 0, done.stderr[-3000:]
  evaluation = json.loads((tmp_path / 'out' / 'summary.json').read_text())['evaluation']
  assert (evaluation['labelled_images'], evaluation['unlabelled_images']) == (7, 1)  # .JPG scored
  assert evaluation['unlabelled_other_form'] == 1
  example, = evaluation['unlabelled_other_form_examples']
  assert (example['image_name'], example['csv_name']) == (DECOMPOSED, COMPOSED)
  said = [line for line in done.stdout.splitlines() if 'not scored' in line]
  assert len(said) == 1 and 'NFC (composed characters)' in said[0], done.stdout


@pytest.mark.slow
def test_rows_without_images_cost_a_few_hundred_bytes_each(sample, tmp_path):
  rows = _tags(sample)
  (tmp_path / 'few.csv').write_text('image_name,tags\n' + '\n'.join(rows) + '\n')
  with open(tmp_path / 'many.csv', 'w') as f:
    f.write('image_name,tags\n' + '\n'.join(rows) + '\n')
    f.writelines(f'absent_{i:06d},clear primary\n' for i in range(ABSENT_ROWS))
  peaks = {}
  for csv in ('few', 'many'):
    peaks[csv] = peak_rss_of([
        '-m', 'beam_jobs.preprocess', '--labels_csv', str(tmp_path / f'{csv}.csv'),
        '--images_dir', str(sample / 'train-jpg'), '--output_dir', str(tmp_path / csv),
        '--image_size', '32', '--max_bad_fraction', '1'])
  counts = json.loads((tmp_path / 'many' / 'manifest.json').read_text())['counts']
  assert sum(counts['examples'].values()) == len(rows)
  assert counts['dead_letters'] == {Reason.MISSING_IMAGE.value: ABSENT_ROWS}
  per_row = (peaks['many'] - peaks['few']) / ABSENT_ROWS
  print(f'\npreprocess: {peaks["few"] / 2**20:.0f} MiB with {len(rows)} rows, '
        f'{peaks["many"] / 2**20:.0f} MiB with {ABSENT_ROWS:,} more without images '
        f'({per_row:.0f} bytes a row)')
  assert per_row < BYTES_PER_ABSENT_ROW, peaks


def test_a_csv_name_with_its_extension_is_told_to_drop_it():
  (_, refused), = join_one_bucket([('train_1.JPG', 3, 0b1)], [], [], lambda name: f'/i/{name}.jpg')
  record, = refused
  assert record['reason'] == Reason.MISSING_IMAGE.value
  assert "write the name without it ('train_1')" in record['message']
