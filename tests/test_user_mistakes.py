"""A user's ordinary mistakes never cost them data: wrong folders, odd files, odd names, typos.

Each test here is one acceptance item of the trust issue; RELIABILITY.md names them.
"""
import csv
import hashlib
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from beam_jobs import predict, preprocess
from beam_jobs.make_sample import make_sample
from model import schema, train
from model.output_dir import claim_output_dir
from model.output_layout import CLAIM_FILE, OutputLayout, OutputRefused
from tests.conftest import DATAFLOW_DRY_RUN_ARGS, REPO, read_jsonl

# Generous bounds for a 2-core machine; a FIFO read blindly hangs forever, /dev/zero eats GBs.
HOSTILE_RUN_SECONDS = 60
HOSTILE_PEAK_BYTES = 1.5e9
SMALL_MAX_FILE_BYTES = 1_000_000


def _tree(folder: pathlib.Path) -> dict[str, str]:
  """Every file below `folder` with the sha256 of its bytes (links not followed)."""
  found = {}
  for path in sorted(folder.rglob('*')):
    if path.is_file() and not path.is_symlink():
      found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
  return found


def one_line_error(capsys, command, argv, code=1) -> str:
  """The command exits `code` with one line on stderr, no traceback; returns the line."""
  with pytest.raises(SystemExit) as exit_info:
    command(argv)
  assert exit_info.value.code == code
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
  return err


@pytest.fixture(scope='module')
def sample(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp('mistakes')
  make_sample(str(root / 'data'), count=12, seed=5)
  # The case: images in data/train-jpg, and data/ itself given as the output.
  return root / 'data'


def _preprocess_args(sample, out, *extra):
  return ['--labels_csv', str(sample / 'train_v2.csv'), '--images_dir', str(sample / 'train-jpg'),
          '--output_dir', str(out), '--image_size', '32', *extra]


def _predict_args(images, out, export_base, *extra):
  return ['--input', str(images), '--output_dir', str(out),
          '--model_dir', str(export_base / 'PlanetModel'), *extra]


# ----------------------------------------------------------------------------- output folders


def test_a_folder_of_the_users_files_is_refused_by_every_stage(sample, export_base, tmp_path,
                                                               capsys):
  own = tmp_path / 'my_folder'
  (own / 'train').mkdir(parents=True)
  (own / 'notes.txt').write_text('my notes')
  (own / 'train' / 'photo.jpg').write_bytes(b'my photo')
  (own / 'PlanetModel').mkdir()
  (own / 'PlanetModel' / 'readme.md').write_text('mine')
  before = _tree(own)
  for overwrite in ([], ['--overwrite']):
    err = one_line_error(capsys, preprocess.main, _preprocess_args(sample, own, *overwrite))
    assert "did not write ('PlanetModel/readme.md', 'notes.txt', 'train/photo.jpg')" in err
    err = one_line_error(capsys, predict.main,
                          _predict_args(sample / 'train-jpg', own, export_base, *overwrite))
    assert 'files that predict did not write' in err and 'notes.txt' in err
  # Training's folders: checked before any data is read (the data folder need not exist).
  for flag in ('--job_dir', '--export_base'):
    folders = {'--job_dir': str(tmp_path / 'job'), '--export_base': str(tmp_path / 'export'),
               flag: str(own)}
    err = one_line_error(capsys, train.main, ['--data_dir', str(tmp_path / 'prep'),
                                               *[x for kv in folders.items() for x in kv]])
    assert flag in err and 'notes.txt' in err, err
  assert _tree(own) == before and not (own / CLAIM_FILE).exists()


@pytest.mark.parametrize('where', ['parent of the images', 'the images folder', 'inside the images',
                                   'the labels file'])
def test_preprocess_output_overlapping_an_input_is_refused_untouched(sample, tmp_path, capsys,
                                                                     where):
  out = {'parent of the images': sample, 'the images folder': sample / 'train-jpg',
         'inside the images': sample / 'train-jpg' / 'out',
         'the labels file': sample / 'train_v2.csv'}[where]
  before = _tree(sample)
  for overwrite in ([], ['--overwrite']):
    err = one_line_error(capsys, preprocess.main, _preprocess_args(sample, out, *overwrite))
    assert 'nothing was touched' in err and ('--images_dir' in err or '--labels_csv' in err)
  assert _tree(sample) == before and not (sample / 'train-jpg' / 'out').exists()


def test_predict_output_overlapping_an_input_is_refused_untouched(sample, export_base, tmp_path,
                                                                  capsys):
  images = sample / 'train-jpg'
  before, model_before = _tree(sample), _tree(export_base)
  for out, relation in ((images, ' is --input'), (images / 'predictions', 'lies inside --input'),
                        (sample, 'contains --input'), (export_base / 'PlanetModel', '--model_dir'),
                        (sample / 'train_v2.csv', '--labels_csv')):
    err = one_line_error(capsys, predict.main, _predict_args(
        images, out, export_base, '--labels_csv', str(sample / 'train_v2.csv'), '--overwrite'))
    assert relation in err and 'nothing was touched' in err, err
  assert _tree(sample) == before and _tree(export_base) == model_before


def test_overwrite_deletes_exactly_an_earlier_run_and_nothing_else(tmp_path):
  layout = OutputLayout('demo', ('predictions-?????-of-?????.jsonl', 'split/part-?????.rec',
                                 'beam-temp-*/*'))
  out = tmp_path / 'out'
  claim_output_dir(str(out), layout, overwrite=False).release()
  ours = ['predictions-00000-of-00002.jsonl', 'split/part-00001.rec', 'beam-temp-x-1/abc']
  for name in ours:
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text('ours')
  with pytest.raises(OutputRefused, match=r'unfinished run \(killed or failed: no manifest\) of '
                                          'demo; pass --overwrite to delete exactly those 4 files'):
    claim_output_dir(str(out), layout, overwrite=False)
  claim_output_dir(str(out), layout, overwrite=True).release()
  assert sorted(p.name for p in out.rglob('*')) == [CLAIM_FILE]   # the emptied folders too

  # A file named like ours, in a folder that no manifest or claim of ours proves we wrote.
  stranger = tmp_path / 'stranger'
  stranger.mkdir()
  (stranger / 'predictions-00000-of-00001.jsonl').write_text('theirs')
  with pytest.raises(OutputRefused, match='no demo manifest or claim file proves'):
    claim_output_dir(str(stranger), layout, overwrite=True)
  assert (stranger / 'predictions-00000-of-00001.jsonl').read_text() == 'theirs'

  # A file that is a link is never followed: its target is not ours to delete.
  target = tmp_path / 'precious.txt'
  target.write_text('keep')
  (out / 'predictions-00001-of-00002.jsonl').symlink_to(target)
  claim_output_dir(str(out), layout, overwrite=True).release()
  assert target.read_text() == 'keep' and not (out / 'predictions-00001-of-00002.jsonl').exists()


@pytest.mark.slow
def test_overwrite_over_real_outputs_replaces_them(sample, export_base, tmp_path):
  prep = tmp_path / 'prep'
  first = preprocess.run(_preprocess_args(sample, prep, '--num_shards', '3')).manifest
  assert len(first['shards']['train']) == 3
  second = preprocess.run(_preprocess_args(sample, prep, '--num_shards', '1', '--overwrite'))
  assert sorted(p.name for p in (prep / 'train').iterdir()) == ['part-00000-of-00001.tfrecord']
  assert second.manifest['counts'] == first['counts']

  out = tmp_path / 'predictions'
  predict.run(_predict_args(sample / 'train-jpg', out, export_base))
  written = sorted(p.name for p in out.iterdir())
  predict.run(_predict_args(sample / 'train-jpg', out, export_base, '--overwrite'))
  assert sorted(p.name for p in out.iterdir()) == written


# ----------------------------------------------------------------------------- what sits in a folder


def _sixteen_bit_png(path: pathlib.Path) -> np.ndarray:
  """A 16-bit grey PNG at `path`; returns the 8-bit grey picture it should decode to."""
  y, x = np.mgrid[0:64, 0:64]
  grey16 = ((x * 1000 + y * 20) % 65536).astype(np.uint16)
  Image.fromarray(grey16).save(path, format='PNG')
  assert Image.open(path).mode.startswith('I')
  return np.round(grey16 / 257).astype(np.uint8)


HOSTILE = {'fifo': 'NOT_A_REGULAR_FILE', 'zero': 'NOT_A_REGULAR_FILE',
           'urandom': 'NOT_A_REGULAR_FILE', 'broken': 'BROKEN_LINK', 'loop': 'BROKEN_LINK',
           'folder': 'NOT_A_REGULAR_FILE', 'huge': 'FILE_TOO_LARGE'}


def _add_hostile_entries(folder: pathlib.Path, extension: str) -> None:
  os.mkfifo(folder / f'fifo{extension}')
  (folder / f'zero{extension}').symlink_to('/dev/zero')
  (folder / f'urandom{extension}').symlink_to('/dev/urandom')
  (folder / f'broken{extension}').symlink_to(folder / 'nowhere')
  (folder / f'loop{extension}').symlink_to(folder / f'loop{extension}')
  (folder / f'folder{extension}').mkdir()
  with open(folder / f'huge{extension}', 'wb') as f:   # sparse: no disk space, all zeros
    f.truncate(SMALL_MAX_FILE_BYTES + 1)


def _run_measured(argv: list[str]) -> tuple[subprocess.CompletedProcess, int]:
  """Runs a command in a fresh process; returns it and its peak resident memory in bytes."""
  wrapper = ('import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=False); '
             'print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)')
  started = time.monotonic()
  done = subprocess.run([sys.executable, '-c', wrapper, sys.executable, *argv], cwd=REPO,
                        capture_output=True, text=True, timeout=HOSTILE_RUN_SECONDS * 2)
  assert time.monotonic() - started < HOSTILE_RUN_SECONDS, done.stderr[-2000:]
  peak = int(done.stderr.strip().splitlines()[-1])
  return done, peak


def test_preprocess_refuses_what_is_not_an_image_file_in_bounded_time_and_memory(sample, tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  for chip in (sample / 'train-jpg').iterdir():
    (images / chip.name).write_bytes(chip.read_bytes())
  _add_hostile_entries(images, '.jpg')
  grey = _sixteen_bit_png(images / 'deep.jpg')   # the extension is never trusted
  rows = (sample / 'train_v2.csv').read_text().rstrip('\n').splitlines()
  rows += [f'{name},clear primary' for name in [*HOSTILE, 'deep']]
  labels = tmp_path / 'labels.csv'
  labels.write_text('\n'.join(rows) + '\n')
  out = tmp_path / 'prep'
  done, peak = _run_measured([
      '-m', 'beam_jobs.preprocess', '--labels_csv', str(labels), '--images_dir', str(images),
      '--output_dir', str(out), '--image_size', '64', '--eval_fraction', '0.01',
      '--max_file_bytes', str(SMALL_MAX_FILE_BYTES), '--max_bad_fraction', '0.5'])
  assert done.returncode == 0, done.stderr[-3000:]
  assert peak < HOSTILE_PEAK_BYTES
  manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
  counts = manifest['counts']
  assert counts['csv_rows'] == len(rows) - 1 == sum(counts['examples'].values()) + len(HOSTILE)
  letters = {r['image_name']: r['reason'] for r in read_jsonl(out / 'dead_letters' / '*.jsonl')}
  assert letters == HOSTILE

  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from model.tf_example import feature_spec  # pylint: disable=import-outside-toplevel
  spec = feature_spec(with_identity=True)
  shards = [str(out / s) for s in manifest['shards']['train'] + manifest['shards']['eval']]
  examples = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(shards)]
  deep = next(e for e in examples if e[schema.KEY_NAME].numpy() == b'deep')
  pixels = np.frombuffer(deep[schema.KEY_PIXELS].numpy(), dtype=np.uint8)
  assert abs(pixels.mean() - grey.mean()) < 2 and pixels.mean() < 200   # not clipped to white


@pytest.mark.slow
def test_predict_refuses_what_is_not_an_image_file_in_bounded_time_and_memory(sample, export_base,
                                                                              tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  for chip in (sample / 'train-jpg').iterdir():
    (images / chip.name).write_bytes(chip.read_bytes())
  _add_hostile_entries(images, '.jpg')
  grey = _sixteen_bit_png(images / 'deep.png')
  Image.fromarray(grey).save(images / 'deep_8bit.png')
  out = tmp_path / 'out'
  done, peak = _run_measured([
      '-m', 'beam_jobs.predict', *_predict_args(images, out, export_base),
      '--max_file_bytes', str(SMALL_MAX_FILE_BYTES), '--max_bad_fraction', '0.5'])
  assert done.returncode == 0, done.stderr[-3000:]
  assert peak < HOSTILE_PEAK_BYTES
  counts = json.loads((out / schema.MANIFEST_FILE).read_text())['counts']
  letters = {r['image_name']: r['reason']
             for r in read_jsonl(out / schema.DEAD_LETTERS_DIR / '*.jsonl')}
  assert letters == HOSTILE
  predictions = {r['image_name']: r for r in read_jsonl(out / 'predictions-*.jsonl')}
  assert counts['images_matched'] == 12 + 2 + len(HOSTILE) == len(predictions) + len(letters)
  # The 16-bit picture is predicted on the same pixels as its 8-bit copy.
  for head in ('weather', 'ground'):
    assert predictions['deep'][head] == pytest.approx(predictions['deep_8bit'][head], abs=1e-6)


# ----------------------------------------------------------------------------- valid outputs


ODD_NAMES = ['comma,name', 'quote"name', 'cr\rname', 'lf\nname', 'crlf\r\nname', '=SUM(A1)',
             '+cmd', '-12.5_44.1', '@import', 'plain']


def test_submission_is_valid_csv_for_any_name(tmp_path):
  from tests.test_submission import write   # pylint: disable=import-outside-toplevel
  rows = [{'image_name': name, 'tags': ['clear', 'primary']} for name in ODD_NAMES]
  write(rows, tmp_path / schema.SUBMISSION_FILE)
  text = (tmp_path / schema.SUBMISSION_FILE).read_bytes().decode('utf-8')
  read = list(csv.reader(io.StringIO(text, newline=''), strict=True))
  assert read[0] == ['image_name', 'tags'] and len(read) == len(rows) + 1
  assert all(len(row) == 2 and row[1] == 'clear primary' for row in read[1:])
  written = [row[0] for row in read[1:]]
  # The formula rule: a name a spreadsheet would run gets one leading apostrophe, nothing else.
  expected = sorted(ODD_NAMES)
  assert written == ["'" + n if n[0] in '=+-@' else n for n in expected]
  assert not any(cell.startswith(('=', '+', '-', '@')) for cell in written)


def test_predict_writes_odd_file_names_as_one_row_each(sample, export_base, tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  chip = next((sample / 'train-jpg').iterdir()).read_bytes()
  for name in ODD_NAMES:
    (images / f'{name}.jpg').write_bytes(chip)
  out = tmp_path / 'out'
  predict.run(_predict_args(images, out, export_base))
  with open(out / schema.SUBMISSION_FILE, newline='', encoding='utf-8') as f:
    read = list(csv.reader(f, strict=True))
  assert len(read) == len(ODD_NAMES) + 1
  names = {r['image_name'] for r in read_jsonl(out / 'predictions-*.jsonl')}
  assert names == set(ODD_NAMES)   # the machine-readable output keeps every name exactly
  assert {row[0].removeprefix("'") for row in read[1:]} == set(ODD_NAMES)


# ----------------------------------------------------------------------------- clean stops


def test_configuration_errors_are_one_line_before_anything_runs(sample, export_base, tmp_path,
                                                                capsys):
  header_only = tmp_path / 'header_only.csv'
  header_only.write_text('image_name,tags\n\n')
  err = one_line_error(capsys, preprocess.main, [
      '--labels_csv', str(header_only), '--images_dir', str(sample / 'train-jpg'),
      '--output_dir', str(tmp_path / 'p1')])
  assert 'has a header but no rows' in err
  huge_header = tmp_path / 'huge.csv'
  huge_header.write_bytes(b'x' * 10_000_000)
  err = one_line_error(capsys, preprocess.main, [
      '--labels_csv', str(huge_header), '--images_dir', str(sample / 'train-jpg'),
      '--output_dir', str(tmp_path / 'p2')])
  assert len(err) < 500
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  err = one_line_error(capsys, preprocess.main, _preprocess_args(sample, a_file))
  assert 'is a file, not a folder' in err
  err = one_line_error(capsys, predict.main, _predict_args(sample / 'train-jpg', a_file,
                                                            export_base))
  assert 'is a file, not a folder' in err
  err = one_line_error(capsys, predict.main, _predict_args(
      sample / 'train-jpg', tmp_path / 'p3', export_base, '--labels_csv', str(header_only)))
  assert 'has a header but no rows' in err
  assert not any((tmp_path / name).exists() for name in ('p1', 'p2', 'p3'))


@pytest.mark.parametrize('command', [preprocess.main, predict.main])
def test_a_misspelled_flag_is_refused_with_the_closest_one(command, sample, export_base, tmp_path,
                                                           capsys):
  args = (_preprocess_args(sample, tmp_path / 'out') if command is preprocess.main
          else _predict_args(sample / 'train-jpg', tmp_path / 'out', export_base))
  err = one_line_error(capsys, command, [*args, '--max_bad_fractoin', '0.5'], code=2)
  assert 'unknown flag --max_bad_fractoin (did you mean --max_bad_fraction?)' in err
  err = one_line_error(capsys, command, [*args, '--direct_num_worker=2'], code=2)
  assert 'did you mean --direct_num_workers?' in err
  assert not (tmp_path / 'out').exists()
  # Beam's own options, the Dataflow runner's included, still pass.
  parse = preprocess.parse_args if command is preprocess.main else predict.parse_args
  beam_args = ['--runner=DirectRunner', '--direct_num_workers', '2',
               '--direct_running_mode=multi_processing', *DATAFLOW_DRY_RUN_ARGS]
  assert parse([*args, *beam_args])[1] == beam_args


def test_overlapping_inputs_count_each_file_once(sample, export_base, tmp_path):
  images = tmp_path / 'chips [2024]'   # glob characters: a folder that exists is taken literally
  (images / 'sub').mkdir(parents=True)
  chips = sorted((sample / 'train-jpg').iterdir())
  for chip in chips[:6]:
    (images / chip.name).write_bytes(chip.read_bytes())
  for chip in chips[6:9]:
    (images / 'sub' / chip.name).write_bytes(chip.read_bytes())
  out = tmp_path / 'out'
  summary = predict.run(['--input', str(images), '--input', str(images) + '/',
                         '--input', str(images / 'sub'), '--output_dir', str(out),
                         '--model_dir', str(export_base / 'PlanetModel')])
  assert summary['counts'] == {'images_matched': 9, 'predictions': 9, 'dead_letters': 0}


def _interrupt_mid_job(argv, out: pathlib.Path, working) -> subprocess.CompletedProcess:
  """Runs a job, sends Ctrl-C to its process group once `working()` says it is at work on the
  images, and waits."""
  # A shell started in the background ignores SIGINT, and so would the job: reset it.
  job = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  deadline = time.monotonic() + 60
  while not working() and job.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  assert job.poll() is None, 'the job ended before it was interrupted'
  os.killpg(job.pid, signal.SIGINT)
  stdout, stderr = job.communicate(timeout=60)
  # Nothing the job started outlives it (the preprocess job's encoder processes, Beam's workers).
  deadline = time.monotonic() + 5
  while _group_alive(job.pid) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _group_alive(job.pid), 'a process of the interrupted job is still running'
  return subprocess.CompletedProcess(argv, job.returncode, stdout, stderr)


def _group_alive(group: int) -> bool:
  try:
    os.killpg(group, 0)
  except ProcessLookupError:
    return False
  return True


@pytest.mark.slow
def test_ctrl_c_ends_a_job_with_one_line_and_nothing_published(tmp_path, export_base):
  make_sample(str(tmp_path / 'many'), count=2500, seed=9)
  images = tmp_path / 'many' / 'train-jpg'
  prep, pred = tmp_path / 'prep', tmp_path / 'pred'
  claimed_at = {}

  def predicting():   # its claim written 1.5 s ago: the pipeline is running
    if (pred / CLAIM_FILE).exists():
      claimed_at.setdefault('pred', time.monotonic())
    return time.monotonic() - claimed_at.get('pred', time.monotonic()) > 1.5

  for argv, out, rerun, working in (
      (['-m', 'beam_jobs.preprocess', '--labels_csv', str(tmp_path / 'many' / 'train_v2.csv'),
        '--images_dir', str(images), '--output_dir', str(prep)], prep, preprocess.run,
       # Examples being written into the shards' parts: the encoder processes are at work.
       lambda: any(prep.glob('*/beam-temp-*-parts-*/*'))),
      (['-m', 'beam_jobs.predict', *_predict_args(images, pred, export_base)], pred, predict.run,
       predicting)):
    done = _interrupt_mid_job(argv, out, working)
    assert done.returncode == 130, done.stderr[-2000:]
    ours = [line for line in done.stderr.splitlines() if 'interrupted' in line]
    assert len(ours) == 1 and 'Traceback' not in done.stderr, done.stderr[-3000:]
    assert not (out / schema.MANIFEST_FILE).exists()
    rerun([*argv[2:], '--overwrite'])
    assert (out / schema.MANIFEST_FILE).exists()
