"""submission.csv from ordered name buckets (issue 14): the same bytes as sorting all rows at once.

The oracle is `oracle`, the rendering of every row in one process that the job used before; the
transform must give its bytes exactly, with many buckets, on both local runners.
"""
import random
import shutil

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs import make_sample, predict
from beam_jobs.common import progress
from beam_jobs.predict import rows as predict_rows
from beam_jobs.predict.config import LAYOUT
from beam_jobs.predict.submission import HEADER, WriteSubmission, bucket_boundaries
from model import schema
from tests.conftest import read_jsonl

# Names a CSV, a spreadsheet or a sort can get wrong: separators, quotes, line breaks, formula
# characters, case, prefixes of each other, and characters whose order differs between code
# points (Python's str order, the oracle's) and UTF-16 (U+FFFF vs U+1F600).
HOSTILE_NAMES = ['a,b', 'say "hi"', 'line\nbreak', 'carriage\rreturn', 'crlf\r\nname', '=1+2',
                 '+cmd', '-2', '@sum', '\tindent', '\rstart', 'plain', 'Plain', 'plain ',
                 'plai', 'é', 'e\u0301', '日本語', '\uffff', '😀', "'quoted", ' lead', '',
                 'naïve,"both"\n']
ROWS_PER_BUCKET = 40
ROWS_PER_BATCH = 7


def sample_rows(count: int, seed: int = 5) -> list[dict]:
  """`count` rows with unique names (the hostile ones among them) and random tags."""
  rng = random.Random(seed)
  names = HOSTILE_NAMES + [f'img_{rng.randrange(10**6)}_{i}' for i in range(count)]
  names = names[:count]
  rng.shuffle(names)
  labels = list(schema.ALL_LABELS)
  return [{'image_name': name, 'path': f'/in/{i}.jpg',
           'tags': rng.sample(labels, rng.randrange(0, 4))} for i, name in enumerate(names)]


def write(rows: list[dict], path, *pipeline_args: str) -> dict:
  """Runs WriteSubmission over `rows`, in RowBatches as the job gives them, on the DirectRunner;
  returns its counters."""
  pipeline = beam.Pipeline(options=PipelineOptions(['--runner=DirectRunner', *pipeline_args]))
  batches = [predict_rows.row_batch(rows[at:at + ROWS_PER_BATCH])
             for at in range(0, len(rows), ROWS_PER_BATCH)]
  _ = (pipeline
       | beam.Create(batches)
       | WriteSubmission(str(path), rows_per_bucket=ROWS_PER_BUCKET))
  result = pipeline.run()
  result.wait_until_finish()
  return progress.query_counters(result)


def oracle(rows: list[dict]) -> bytes:
  """What the job wrote before: every row sorted and rendered at once, written as UTF-8."""
  lines = sorted((predict_rows.submission_line(row) for row in rows), key=lambda pair: pair[0])
  return (HEADER + ''.join(line for _, line in lines)).encode('utf-8')


def test_many_buckets_give_the_bytes_of_sorting_every_row_at_once(tmp_path):
  rows = sample_rows(400)
  path = tmp_path / 'submission.csv'
  counters = write(rows, path)
  assert counters['submission_buckets'] >= 5
  assert path.read_bytes() == oracle(rows)
  assert [p.name for p in tmp_path.iterdir()] == ['submission.csv']   # the parts are gone


@pytest.mark.slow
def test_worker_processes_give_the_same_bytes(tmp_path):
  rows = sample_rows(300, seed=9)
  path = tmp_path / 'submission.csv'
  counters = write(rows, path, '--direct_running_mode=multi_processing', '--direct_num_workers=2')
  assert counters['submission_buckets'] >= 5
  assert path.read_bytes() == oracle(rows)
  assert [p.name for p in tmp_path.iterdir()] == ['submission.csv']


def test_no_rows_give_the_header_only(tmp_path):
  path = tmp_path / 'submission.csv'
  write([], path)
  assert path.read_bytes() == oracle([]) == HEADER.encode()


def test_boundaries_keep_names_in_order_and_buckets_near_their_size():
  names = sorted(f'n{i:04d}' for i in range(1000))
  quantiles = [names[round(i * 999 / 100)] for i in range(101)]
  boundaries = bucket_boundaries(quantiles, len(names), 100)
  assert boundaries == sorted(boundaries) and len(boundaries) == 9
  sizes = [sum(lo <= n < hi for n in names)
           for lo, hi in zip([''] + boundaries, boundaries + ['\U0010ffff'])]
  assert sum(sizes) == 1000 and max(sizes) <= 110
  assert bucket_boundaries(quantiles, 1000, 1000) == []       # one bucket: no boundary
  assert bucket_boundaries([], 0, 100) == []


def test_a_killed_runs_parts_are_the_jobs_own_files():
  # What a run killed while writing submission.csv leaves: --overwrite may delete it.
  folder = 'beam-temp-submission-0f1e2d3c4b5a69788796a5b4c3d2e1f0'
  for name in ('part-00003-0123456789abcdef0123456789abcdef.csv', schema.SUBMISSION_FILE):
    assert LAYOUT.owns(f'{folder}/{name}')


@pytest.fixture(scope='module')
def hostile_folder(tmp_path_factory):
  """Chips under names a CSV must quote or a spreadsheet would run (file names allow them)."""
  root = tmp_path_factory.mktemp('hostile_names')
  make_sample.make_sample(str(root / 'sample'), count=12, seed=3)
  images = root / 'images'
  images.mkdir()
  names = ['a,b', 'say "hi"', 'line\nbreak', '=1+2', '-2', '@sum', 'é', '日本語', 'Plain',
           'plain', 'x\ry', 'ok']
  for i, name in enumerate(names):
    shutil.copy(root / 'sample' / 'train-jpg' / f'train_{i}.jpg', images / f'{name}.jpg')
  return images


def test_the_job_writes_the_same_submission_as_before(hostile_folder, export_base, tmp_path):
  out = tmp_path / 'out'
  predict.run(['--input', str(hostile_folder), '--output_dir', str(out),
               '--model_dir', str(export_base / schema.MODEL_NAME)])
  rows = read_jsonl(out / f'{schema.PREDICTIONS_PREFIX}-*.jsonl')
  assert len(rows) == 12
  assert (out / schema.SUBMISSION_FILE).read_bytes() == oracle(rows)
  assert not list(out.glob('beam-temp-*'))
