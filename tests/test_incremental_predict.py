"""Incremental (--previous_output) and resumable (--resume) prediction: issue 16's acceptance.

The issue's 2,000 / 200 / 50 / 100 images are scaled to 400 / 40 / 10 / 20 here (the full size
was run by hand for benchmarks/RESULTS.md). Inferences are counted by the job's Beam counter
`predictions` (rows made by the model in that run) and, through TF Serving, by the server itself.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import apache_beam as beam
import numpy as np
import pytest

from beam_jobs import make_sample, predict
from beam_jobs.common import progress
from beam_jobs.common.buckets import name_bucket
from beam_jobs.predict import carry_over, completed_rows, incremental
from beam_jobs.predict import rows as predict_rows
from beam_jobs.predict.config import REMOVED_FILE
from model import schema
from model.manifest import ManifestMissing
from model.output_layout import OutputRefused
from model.serving.faults import Faults
from model.serving.local_server import LocalServingServer
from tests.conftest import DATAFLOW_DRY_RUN_ARGS, REPO, make_export_base, read_jsonl

SIZE = 32
BEFORE, ADDED, REWRITTEN, DELETED = 400, 40, 10, 20
RESUME_IMAGES = 2400
PREDICTIONS = f'{schema.PREDICTIONS_PREFIX}-*.jsonl'


@contextlib.contextmanager
def pipeline_results():
  """Every pipeline result of the runs inside, so their counters can be read."""
  results = []
  original_run = beam.Pipeline.run

  def run_and_keep(self, *args, **kwargs):
    results.append(original_run(self, *args, **kwargs))
    return results[-1]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(beam.Pipeline, 'run', run_and_keep)
    yield results


def run_counted(argv: list[str]) -> tuple[dict, dict]:
  """predict.run(argv) -> (summary, the job's counters)."""
  with pipeline_results() as results:
    summary = predict.run(argv)
  return summary, progress.query_counters(results[-1])


def job_args(images, out, export, *extra) -> list[str]:
  return ['--input', str(images), '--output_dir', str(out),
          '--model_dir', str(export / schema.MODEL_NAME), *extra]


def rows_by_name(out) -> dict[str, dict]:
  rows = read_jsonl(out / PREDICTIONS)
  assert len(rows) == len({r['image_name'] for r in rows})   # one row per image
  return {r['image_name']: r for r in rows}


def assert_rows_close(rows: dict, expected: dict, tolerance: float) -> float:
  """Same names, fields and tags; probabilities within `tolerance`. Returns the largest gap."""
  assert rows.keys() == expected.keys()
  largest = 0.0
  for name, row in rows.items():
    want = expected[name]
    for head in ('weather', 'ground'):
      got, wanted = (np.array([r[head][label] for label in sorted(r[head])]) for r in (row, want))
      largest = max(largest, float(np.abs(got - wanted).max()))
      assert largest <= tolerance, (name, head)
    assert {k: v for k, v in row.items() if k not in ('weather', 'ground')} == {
        k: v for k, v in want.items() if k not in ('weather', 'ground')}, name
  return largest


def kept_rows(out) -> dict[str, dict]:
  """The rows an unfinished run kept in its part files, by name."""
  return {r['image_name']: r for r in read_jsonl(out / completed_rows.FILE_PATTERN)}


def start_job(argv: list[str], log) -> subprocess.Popen:
  with open(log, 'wb') as output:
    return subprocess.Popen([sys.executable, '-m', 'beam_jobs.predict', *argv], cwd=REPO,
                            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, process: subprocess.Popen, log, timeout: float = 180.0,
             then_kill: bool = False) -> None:
  """Polls `condition` every 5 ms, then SIGKILLs the job's process group if `then_kill`;
  fails when the job ends first or time runs out."""
  started = time.monotonic()
  while not condition():
    if process.poll() is not None:
      pytest.fail(f'the job ended ({process.returncode}) first:\n{log.read_text()[-3000:]}')
    if time.monotonic() - started > timeout:
      os.killpg(process.pid, signal.SIGKILL)
      pytest.fail(f'waited {timeout:g} s:\n{log.read_text()[-3000:]}')
    time.sleep(0.005)
  if then_kill:
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


# ----------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope='module')
def export(tmp_path_factory):
  return make_export_base(tmp_path_factory, SIZE)


@pytest.fixture(scope='module')
def chips(tmp_path_factory):
  """BEFORE + ADDED chips, and REWRITTEN other chips to rewrite images with (read-only)."""
  root = tmp_path_factory.mktemp('chips')
  make_sample.make_sample(str(root / 'main'), count=BEFORE + ADDED, seed=41)
  make_sample.make_sample(str(root / 'other'), count=REWRITTEN, seed=43)
  return root


@pytest.fixture(scope='module')
def changed_folder(tmp_path_factory, chips, export):
  """BEFORE images predicted; then ADDED added, REWRITTEN rewritten, DELETED deleted in place,
  and that folder predicted with --previous_output and from scratch."""
  root = tmp_path_factory.mktemp('changed')
  images = root / 'images'
  images.mkdir()
  for i in range(BEFORE):
    shutil.copy(chips / 'main' / 'train-jpg' / f'train_{i}.jpg', images)
  predict.run(job_args(images, root / 'first', export))

  for i in range(DELETED):
    (images / f'train_{i}.jpg').unlink()
  rewritten = [f'train_{i}' for i in range(DELETED, DELETED + REWRITTEN)]
  for i, name in enumerate(rewritten):
    shutil.copy(chips / 'other' / 'train-jpg' / f'train_{i}.jpg', images / f'{name}.jpg')
  for i in range(BEFORE, BEFORE + ADDED):
    shutil.copy(chips / 'main' / 'train-jpg' / f'train_{i}.jpg', images)

  labels = ['--labels_csv', str(chips / 'main' / 'train_v2.csv')]
  return {'root': root, 'images': images, 'rewritten': rewritten,
          'incremental': run_counted(job_args(images, root / 'incremental', export, *labels,
                                              '--previous_output', str(root / 'first'))),
          'full': run_counted(job_args(images, root / 'full', export, *labels))}


# ----------------------------------------------------------------------------- --previous_output


def test_previous_output_infers_only_added_and_rewritten_images(changed_folder):
  summary, counters = changed_folder['incremental']
  unchanged = BEFORE - DELETED - REWRITTEN
  assert counters['predictions'] == ADDED + REWRITTEN           # inferred by the model
  assert counters['images_carried'] == unchanged
  assert summary['incremental'] == {
      'carried': unchanged, 'resumed': 0, 'new': ADDED, 'changed': REWRITTEN, 'other_model': 0,
      'removed': DELETED, 'previous_output': str(changed_folder['root'] / 'first'), 'note': None}
  assert summary['counts'] == {'images_matched': BEFORE - DELETED + ADDED,
                               'predictions': BEFORE - DELETED + ADDED, 'dead_letters': 0}
  removed = read_jsonl(changed_folder['root'] / 'incremental' / REMOVED_FILE)
  assert sorted(r['image_name'] for r in removed) == sorted(f'train_{i}' for i in range(DELETED))
  out = changed_folder['root'] / 'incremental'
  manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
  assert manifest['incremental'] == summary['incremental']
  assert manifest['counts']['predictions'] == BEFORE - DELETED + ADDED
  assert not (out / completed_rows.FOLDER).exists()   # its kept rows went with the manifest
  report = (out / schema.REPORT_FILE).read_text()
  assert 'Reused and predicted' in report and 'Carried over' in report
  assert report.count('<img ') == 36                   # drawn from every row, carried included


def test_previous_output_equals_a_full_run_on_the_new_folder(changed_folder):
  root = changed_folder['root']
  first, incremental, full = (rows_by_name(root / name)
                              for name in ('first', 'incremental', 'full'))
  carried = [name for name in incremental
             if name in first and name not in changed_folder['rewritten']]
  assert len(carried) == BEFORE - DELETED - REWRITTEN
  for name in carried:
    assert incremental[name] == first[name]            # carried rows: identical
  for name in changed_folder['rewritten']:
    assert incremental[name]['sha256'] != first[name]['sha256']
  # Every row as a full run gives it: tags, names, fingerprints exactly; probabilities within
  # 1e-6 (a float32 ulp or two apart: the model's results depend slightly on batch composition,
  # so two full runs over different folders differ as much).
  difference = assert_rows_close(incremental, full, 1e-6)
  assert ((root / 'incremental' / schema.SUBMISSION_FILE).read_bytes()
          == (root / 'full' / schema.SUBMISSION_FILE).read_bytes())
  summaries = [json.loads((root / out / schema.SUMMARY_FILE).read_text())
               for out in ('incremental', 'full')]
  assert summaries[0]['predicted_label_counts'] == summaries[1]['predicted_label_counts']
  print(f'\nINCREMENTAL vs full run: largest probability difference {difference:.1e}')


def test_f2_covers_every_image_carried_ones_included(changed_folder):
  (incremental, _), (full, _) = changed_folder['incremental'], changed_folder['full']
  evaluations = [incremental['evaluation'], full['evaluation']]
  assert evaluations[0]['labelled_images'] == BEFORE - DELETED + ADDED
  assert evaluations[0]['f2'] == pytest.approx(evaluations[1]['f2'], abs=1e-12)
  assert evaluations[0]['per_label'] == evaluations[1]['per_label']


def test_a_newer_model_version_predicts_every_image_and_says_why(changed_folder, export,
                                                                 tmp_path, capsys):
  newer = tmp_path / 'export'
  shutil.copytree(export, newer)
  shutil.copytree(newer / schema.MODEL_NAME / '1', newer / schema.MODEL_NAME / '2')
  root = changed_folder['root']
  summary, counters = run_counted(job_args(changed_folder['images'], tmp_path / 'out', newer,
                                           '--previous_output', str(root / 'incremental')))
  matched = BEFORE - DELETED + ADDED
  assert counters['predictions'] == matched
  assert summary['incremental']['other_model'] == matched
  assert summary['incremental']['carried'] == 0
  why = (f'--previous_output {root / "incremental"} was predicted by {schema.MODEL_NAME} '
         'version 1, this run uses version 2: every image is predicted again')
  assert summary['incremental']['note'] == why
  assert capsys.readouterr().out.count(why) == 1            # said once, in one line
  assert {r['model_version'] for r in rows_by_name(tmp_path / 'out').values()} == {'2'}


def test_an_untrustworthy_previous_output_is_refused_or_predicted_again(changed_folder, export,
                                                                        tmp_path):
  root, images = changed_folder['root'], changed_folder['images']

  def run_with(previous, out='out'):
    return run_counted(job_args(images, tmp_path / out, export, '--previous_output',
                                str(previous)))

  # Refused before anything is written: no manifest, another stage's, a listed file missing.
  unfinished = shutil.copytree(root / 'incremental', tmp_path / 'unfinished')
  (unfinished / schema.MANIFEST_FILE).unlink()
  with pytest.raises(ManifestMissing, match='has no manifest.json'):
    run_with(unfinished)
  other_stage = shutil.copytree(root / 'incremental', tmp_path / 'other_stage')
  record = json.loads((other_stage / schema.MANIFEST_FILE).read_text())
  (other_stage / schema.MANIFEST_FILE).write_text(json.dumps({**record, 'stage': 'preprocess'}))
  with pytest.raises(ValueError, match="written by stage 'preprocess', not 'predict'"):
    run_with(other_stage)
  cut = shutil.copytree(root / 'incremental', tmp_path / 'cut')
  next(cut.glob(PREDICTIONS)).unlink()
  with pytest.raises(FileNotFoundError, match='its manifest lists .* which is missing'):
    run_with(cut)
  assert not (tmp_path / 'out').exists()

  # Edited by hand: a wrong fingerprint, tags that do not follow from the probabilities, a
  # line that is not a row. Those images are predicted again; every other row is carried.
  edited = shutil.copytree(root / 'incremental', tmp_path / 'edited')
  shard = next(edited.glob(PREDICTIONS))
  rows = [json.loads(line) for line in shard.read_text().splitlines()]
  rows[0]['sha256'] = '0' * 64
  rows[1]['tags'] = ['clear', 'water'] if rows[1]['tags'] != ['clear', 'water'] else ['haze']
  garbled = rows[2]['image_name']
  shard.write_text('\n'.join([json.dumps(r) for r in rows[:2]] + ['{"image_name": "' + garbled]
                             + [json.dumps(r) for r in rows[3:]]) + '\n')
  summary, counters = run_with(edited)
  assert counters['predictions'] == 3 and counters['unusable_previous_rows'] == 1
  assert summary['incremental']['carried'] == BEFORE - DELETED + ADDED - 3
  assert_rows_close(rows_by_name(tmp_path / 'out'), rows_by_name(root / 'full'), 1e-6)


@pytest.mark.slow
def test_worker_processes_give_the_same_incremental_output(changed_folder, export, tmp_path):
  root = changed_folder['root']
  summary, _ = run_counted(job_args(changed_folder['images'], tmp_path / 'multi', export,
                                    '--previous_output', str(root / 'first'),
                                    '--direct_running_mode=multi_processing',
                                    '--direct_num_workers=2'))
  assert summary['incremental'] == changed_folder['incremental'][0]['incremental']
  assert_rows_close(rows_by_name(tmp_path / 'multi'), rows_by_name(root / 'incremental'), 1e-6)


@pytest.mark.slow
def test_dataflow_dry_run_translates_the_join(monkeypatch, changed_folder, export):
  monkeypatch.chdir(REPO)   # --setup_file=./setup.py, as a user runs it
  summary = predict.run(job_args(changed_folder['images'], 'gs://my-bucket/out', export,
                                 '--previous_output', str(changed_folder['root'] / 'first'),
                                 *DATAFLOW_DRY_RUN_ARGS))
  for step in ('Fingerprint', 'ReadPreviousRows', 'JoinByName', 'Decide', 'ReadAndDecode',
               'RunInference', 'KeepCompleted', 'AllRows', 'WritePredictions', 'WriteRemoved',
               'WriteReport'):
    assert any(step in transform for transform in summary['transforms']), step


# ----------------------------------------------------------------------------- --resume


@pytest.fixture(scope='module')
def many_images(tmp_path_factory, chips):
  """RESUME_IMAGES images, each a hard link to one of the chips in turn (read-only)."""
  folder = tmp_path_factory.mktemp('many') / 'images'
  folder.mkdir()
  sources = sorted((chips / 'main' / 'train-jpg').glob('*.jpg'))
  for i in range(RESUME_IMAGES):
    os.link(sources[i % len(sources)], folder / f'img_{i:05d}.jpg')
  return folder


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, many_images, export):
  """An uninterrupted in-process run over `many_images` (read-only)."""
  out = tmp_path_factory.mktemp('uninterrupted')
  predict.run(job_args(many_images, out, export))
  return out


def kept_count(out) -> int:
  return sum(path.read_bytes().count(b'\n') for path in out.glob(completed_rows.FILE_PATTERN))


def files_in(out) -> list[str]:
  """Every file and folder below `out` (an empty folder left by the killed run counts)."""
  return sorted(str(p.relative_to(out)) + ('/' if p.is_dir() else '') for p in out.rglob('*'))


def assert_resumed_equals_uninterrupted(out, kept: dict, uninterrupted, tolerance: float) -> float:
  """The resumed output is the uninterrupted one; returns the largest probability gap."""
  rows = rows_by_name(out)
  assert all(rows[name] == row for name, row in kept.items())   # kept rows published as kept
  difference = assert_rows_close(rows, rows_by_name(uninterrupted), tolerance)
  assert ((out / schema.SUBMISSION_FILE).read_bytes()
          == (uninterrupted / schema.SUBMISSION_FILE).read_bytes())
  assert files_in(out) == files_in(uninterrupted)            # nothing left of the killed run
  return difference


@pytest.mark.slow
def test_a_killed_job_resumes_without_inferring_completed_images_again(
    many_images, export, uninterrupted, tmp_path):
  out, log = tmp_path / 'out', tmp_path / 'killed.log'
  args = job_args(many_images, out, export)
  process = start_job(args, log)
  wait_for(lambda: kept_count(out) >= RESUME_IMAGES // 3, process, log, then_kill=True)
  kept = kept_rows(out)
  assert 0 < len(kept) < RESUME_IMAGES and not (out / schema.MANIFEST_FILE).exists()

  with pytest.raises(OutputRefused, match=r'unfinished run .*--overwrite .*, or --resume to '
                                          'continue it'):
    predict.run(args)
  other_job = [*args[:1], str(many_images / 'img_00000.jpg'), *args[2:], '--resume']
  with pytest.raises(OutputRefused, match='unfinished run of another predict job .*inputs'):
    predict.run(other_job)
  assert kept_rows(out) == kept                               # refusals touched nothing

  summary, counters = run_counted(args + ['--resume'])
  assert counters['predictions'] == RESUME_IMAGES - len(kept)   # completed images not again
  assert summary['incremental']['resumed'] == len(kept)
  assert summary['counts']['predictions'] == RESUME_IMAGES
  difference = assert_resumed_equals_uninterrupted(out, kept, uninterrupted, 1e-6)
  print(f'\nRESUME in-process: {RESUME_IMAGES} images, killed with {len(kept)} kept; the resumed '
        f'run inferred {counters["predictions"]}; largest difference {difference:.1e}')

  with pytest.raises(OutputRefused, match='finished run of predict .*nothing to resume'):
    predict.run(args + ['--resume'])


@pytest.mark.slow
def test_a_killed_grpc_job_resumes_and_no_image_is_inferred_twice(
    many_images, export, uninterrupted, tmp_path):
  inferred = [0]
  lock = threading.Lock()

  def count(_image) -> bool:   # called by the server on every image it is about to infer
    with lock:
      inferred[0] += 1
    return False

  out, log = tmp_path / 'out', tmp_path / 'killed.log'
  with LocalServingServer(str(export / schema.MODEL_NAME)) as server:
    server.set_faults(Faults(refuse_image=count))
    args = ['--input', str(many_images), '--output_dir', str(out),
            '--serving_address', server.address, '--model_dir', str(export / schema.MODEL_NAME)]
    process = start_job(args, log)
    wait_for(lambda: inferred[0] >= RESUME_IMAGES * 0.6, process, log)
    # From here every new call is refused UNAVAILABLE (the job retries it), so the kill lands
    # once every image the server answered is kept: then nothing is lost to the kill.
    server.set_faults(Faults(failure_fraction=1.0, refuse_image=count))
    wait_for(lambda: kept_count(out) >= inferred[0], process, log, timeout=60, then_kill=True)
    inferred_before_kill = inferred[0]
    kept = kept_rows(out)
    assert len(kept) == inferred_before_kill < RESUME_IMAGES

    server.set_faults(Faults(refuse_image=count))
    summary, counters = run_counted(args + ['--resume'])
  assert inferred[0] - inferred_before_kill == counters['grpc_predicted_images']
  assert counters['predictions'] == RESUME_IMAGES - len(kept)
  assert inferred[0] == RESUME_IMAGES                          # over both runs: each image once
  assert summary['incremental']['resumed'] == len(kept)
  difference = assert_resumed_equals_uninterrupted(out, kept, uninterrupted, 1e-5)
  print(f'\nRESUME gRPC: {RESUME_IMAGES} images, killed with {len(kept)} kept; the server '
        f'inferred {inferred_before_kill} + {inferred[0] - inferred_before_kill}; largest '
        f'difference from the in-process run {difference:.1e}')


# ----------------------------------------------------------------------------- the join's buckets


def earlier_row(name: str, sha256: str) -> dict:
  """A row as the job writes it, for `name` at /in/<name>.jpg with these bytes."""
  inference = {schema.OUTPUT_WEATHER: [0.1, 0.2, 0.3, 0.4],
               schema.OUTPUT_GROUND: [i / 13 for i in range(13)], 'model_version': '1'}
  return predict_rows.result_row(name, f'/in/{name}.jpg', inference, THRESHOLDS, schema.MODEL_NAME,
                                 sha256)


FINGERPRINT = 'sha256:' + '0' * 32
THRESHOLDS = predict_rows.ThresholdsByVersion((0.5,) * 13, known={'1': (0.5,) * 13},
                                              fingerprints={'1': FINGERPRINT})
PLAN = incremental.CarryPlan(schema.MODEL_NAME, '1', FINGERPRINT, carry_previous=True)


def test_a_rows_name_is_found_without_parsing_it_and_checked_once_parsed():
  hostile = 'a "b" \\ }, "image_name": "x\n é 😀'
  line = json.dumps(earlier_row(hostile, 'f' * 64), sort_keys=True)
  assert carry_over.row_name(line) == hostile
  assert carry_over.row_name(json.dumps(earlier_row(hostile, 'f' * 64), indent=1)) == hostile
  assert carry_over.row_name('{"image_name": "cut') is None
  assert carry_over.row_name('["image_name", "a"]') is None
  # Two names in one line (edited by hand): found as the first, parsed as the last: not reused.
  twice = line[:-1] + ', "image_name": "other"}'
  assert carry_over.row_name(twice) == hostile

  gone, kept = earlier_row('gone', 'a' * 64), earlier_row('kept', 'b' * 64)
  batches = [('previous', [(hostile, twice), ('gone', json.dumps(gone, sort_keys=True)),
                           ('kept', json.dumps(kept, sort_keys=True))]),
             ('current', [(hostile, f'/in/{hostile}.jpg', 'f' * 64),
                          ('kept', '/in/kept.jpg', 'b' * 64), ('new', '/in/new.jpg', 'c' * 64)])]
  decide = carry_over.Decide(PLAN, THRESHOLDS)
  decide.start_bundle()
  outputs = list(decide.process((0, batches)))
  tagged = sorted((o.tag, row['image_name']) for o in outputs
                  if isinstance(o, beam.pvalue.TaggedOutput)
                  for row in (o.value.rows if o.tag == 'reused' else [o.value]))
  assert tagged == [('removed', 'gone'), ('reused', 'kept')]
  reused, = [o.value for o in outputs if getattr(o, 'tag', None) == 'reused']   # a RowBatch
  assert reused.lines == [json.dumps(row, sort_keys=True) for row in reused.rows]
  assert sorted(o for o in outputs if not isinstance(o, beam.pvalue.TaggedOutput)) == [
      (hostile, f'/in/{hostile}.jpg'), ('new', '/in/new.jpg')]
  assert [o.value.value for o in decide.finish_bundle()] == [   # (tag, windowed value)
      {'new': 2, 'carried': 1, 'removed': 1}]


def test_buckets_hold_a_bounded_share_of_the_earlier_rows():
  assert carry_over.bucket_count(0) == carry_over.MIN_BUCKETS
  assert carry_over.bucket_count(100 * carry_over.BUCKET_BYTES + 1) == 101
  names = [f'train_{i}' for i in range(8000)] + ['\udcff odd bytes']   # lone surrogate: no error
  sizes = np.bincount([name_bucket(name, 8) for name in names], minlength=8)
  assert len(sizes) == 8 and sizes.min() > 800 and sizes.max() < 1200
