"""What a job publishes is right or absent (issue 23), tried as a user would, with real processes.

The right model's rows (a fingerprint of what the export computes, not its name and version), one
live run per output folder (a second run refused while the first runs, SIGTERM included), nothing
finished-looking after a failure, every folder accounted for, and the machine's own conditions (a
full disk on a real tmpfs, a real unprivileged read) reported in one line.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from beam_jobs import predict, preprocess
from beam_jobs.make_sample import make_sample
from beam_jobs.predict.config import PUBLISHED_LAST, UNPUBLISHED_DIR
from model import schema
from model.export import FINGERPRINT_KEY, export_model
from model.output_layout import CLAIM_FILE
from model.saved_model_info import ExportError, inspect_export
from tests.conftest import REPO, make_export_base, read_jsonl

PREDICTIONS = f'{schema.PREDICTIONS_PREFIX}-*.jsonl'
# A process that keeps root's uid but not its power to read and write past permissions: the
# kernel checks file modes for it as for any user (as root, a chmod 000 file is still readable).
UNPRIVILEGED = (['setpriv', '--bounding-set=-dac_override,-dac_read_search']
                if os.geteuid() == 0 else [])


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp('trusted')
  make_sample(str(root / 'sample'), count=12, seed=23)
  return root / 'sample' / 'train-jpg'


def _predict_argv(images, out, model_dir, *extra) -> list[str]:
  return ['--input', str(images), '--output_dir', str(out), '--model_dir', str(model_dir), *extra]


def _command(module: str, argv: list[str], prefix=(), **kwargs) -> subprocess.CompletedProcess:
  env = {**os.environ, 'PYTHONPATH': str(REPO), **kwargs.pop('env', {})}
  return subprocess.run([*prefix, sys.executable, '-m', module, *argv], capture_output=True,
                        text=True, timeout=300, env=env, cwd=kwargs.pop('cwd', REPO), **kwargs)


def _one_error_line(done: subprocess.CompletedProcess, code: int = 1) -> str:
  """The command's only line on stderr, after checking the exit code and that it is alone."""
  assert done.returncode == code, done.stderr[-3000:]
  assert 'Traceback' not in done.stderr, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if ': error: ' in line]
  assert len(errors) == 1 and len(done.stderr.strip().splitlines()) <= 2, done.stderr[-3000:]
  return errors[0]


# ----------------------------------------------------------------------------- the model's rows


@pytest.mark.slow
def test_previous_output_of_another_model_is_never_carried(images, tmp_path_factory, tmp_path,
                                                           capsys):
  # Two checkpoints exported into two fresh export bases: both "PlanetModel version 1", 0.2.
  base_a, base_b = (make_export_base(tmp_path_factory, 32) for _ in range(2))
  export_a, export_b = (inspect_export(str(b / schema.MODEL_NAME)) for b in (base_a, base_b))
  assert (export_a.version, export_a.ground_thresholds) == (export_b.version,
                                                          export_b.ground_thresholds)
  assert export_a.fingerprint != export_b.fingerprint
  assert export_a.info[FINGERPRINT_KEY] == export_a.fingerprint   # written at export, checked

  out_a = tmp_path / 'a'
  predict.run(_predict_argv(images, out_a, base_a / schema.MODEL_NAME))
  rows_a = read_jsonl(out_a / PREDICTIONS)
  assert {r['model_fingerprint'] for r in rows_a} == {export_a.fingerprint}
  assert json.loads((out_a / schema.MANIFEST_FILE).read_text())['model']['fingerprints'] == {
      '1': export_a.fingerprint}

  capsys.readouterr()
  summary = predict.run(_predict_argv(images, tmp_path / 'b', base_b / schema.MODEL_NAME,
                                      '--previous_output', str(out_a)))
  assert 'compute different things' in capsys.readouterr().out
  assert summary['incremental']['carried'] == 0 and summary['incremental']['other_model'] == 12
  rows_b = read_jsonl(tmp_path / 'b' / PREDICTIONS)
  assert {r['model_fingerprint'] for r in rows_b} == {export_b.fingerprint}
  assert ({r['image_name']: r['ground'] for r in rows_b}
          != {r['image_name']: r['ground'] for r in rows_a})

  # The same export copied elsewhere computes the same: its rows are carried.
  copy = tmp_path / 'copy'
  shutil.copytree(base_a, copy)
  summary = predict.run(_predict_argv(images, tmp_path / 'a2', copy / schema.MODEL_NAME,
                                      '--previous_output', str(out_a)))
  assert summary['incremental']['carried'] == 12

  # An output written before rows named their model's fingerprint: predicted again, one line.
  manifest = json.loads((out_a / schema.MANIFEST_FILE).read_text())
  del manifest['model']['fingerprints']
  (out_a / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
  capsys.readouterr()
  summary = predict.run(_predict_argv(images, tmp_path / 'a3', base_a / schema.MODEL_NAME,
                                      '--previous_output', str(out_a)))
  assert summary['incremental']['carried'] == 0
  assert "before rows recorded their model's fingerprint" in capsys.readouterr().out


def test_rows_kept_by_a_killed_run_resume_only_under_the_same_model():
  """A killed run's export re-made in place (same --model_dir, same version 1, other weights):
  --resume is the same job by its arguments, but its kept rows are another model's."""
  from beam_jobs.predict import incremental
  from beam_jobs.predict import rows as predict_rows
  inference = {schema.OUTPUT_WEATHER: [0.7, 0.1, 0.1, 0.1],
               schema.OUTPUT_GROUND: [0.5] * 13, 'model_version': '1'}
  decided = {}
  for model in ('a', 'b'):
    fingerprint = 'sha256:' + model * 32
    thresholds = predict_rows.ThresholdsByVersion((0.2,) * 13, known={'1': (0.2,) * 13},
                                                  fingerprints={'1': fingerprint})
    if model == 'a':
      kept = predict_rows.result_row('x', '/in/x.jpg', inference, thresholds, schema.MODEL_NAME,
                                     sha256='5' * 64)
      assert kept['model_fingerprint'] == fingerprint
    plan = incremental.plan_carry_over(None, ('part',), schema.MODEL_NAME, '1', thresholds)
    decided[model] = incremental.decide('x', [('/in/x.jpg', '5' * 64)], [], [kept], plan,
                                        thresholds)[0]
  assert decided == {'a': incremental.RESUMED, 'b': incremental.NEW}


def test_a_labels_csv_that_is_a_fifo_is_refused_at_once(images, export_base, tmp_path):
  fifo = tmp_path / 'labels.csv'
  os.mkfifo(fifo)   # opening it to read would wait for a writer forever
  refusal = _one_error_line(_command('beam_jobs.predict', _predict_argv(
      images, tmp_path / 'out', export_base / schema.MODEL_NAME, '--labels_csv', str(fifo))))
  assert refusal == f'predict: error: --labels_csv {fifo} is not a regular file'
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('thresholds', [[float('nan')] * 13, [1.5] * 13, [0.0] * 13, [0.2] * 12])
def test_an_export_whose_thresholds_decide_nothing_is_refused(tmp_path, thresholds):
  from model.network import build_model
  version_dir = export_model(build_model(32), str(tmp_path), {'ground_thresholds': thresholds})
  with pytest.raises(ExportError, match='numbers between 0 and 1'):
    inspect_export(version_dir)


# ----------------------------------------------------------------------------- one live run


def _start(module: str, argv: list[str]) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-m', module, *argv], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True)


def _claimed_by(out: pathlib.Path) -> int | None:
  try:
    return json.loads((out / CLAIM_FILE).read_text())['owner']['pid']
  except (OSError, ValueError, KeyError):
    return None


def _wait_for_claim(job: subprocess.Popen, out: pathlib.Path, settle: float = 1.0) -> None:
  """Until `job`'s claim is in `out` (an earlier run's is not), and `settle` seconds more."""
  deadline = time.monotonic() + 120
  while _claimed_by(out) != job.pid and time.monotonic() < deadline:
    assert job.poll() is None, job.communicate()[1][-3000:]
    time.sleep(0.05)
  time.sleep(settle)
  assert job.poll() is None, 'the first job ended before the second started'


def _published_files_exist(out: pathlib.Path) -> list[str]:
  manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
  # predict lists its files as `outputs`, preprocess its shards by split and its dead letters.
  outputs = manifest.get('outputs') or [
      *(f for split in schema.SPLITS for f in manifest['shards'][split]),
      *manifest['dead_letters']]
  assert outputs and all((out / f).is_file() for f in outputs)
  return outputs


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_runs_and_sigterm_publishes_nothing(
    tmp_path, export_base):
  make_sample(str(tmp_path / 'many'), count=1500, seed=9)
  many = tmp_path / 'many' / 'train-jpg'
  out = tmp_path / 'out'
  argv = _predict_argv(many, out, export_base / schema.MODEL_NAME)

  # The case: the second run follows the old advice, --overwrite, while the first runs
  # (with --tta, 8x the model's work: it is still running when the others have started).
  first = _start('beam_jobs.predict', [*argv, '--tta'])
  _wait_for_claim(first, out)
  others = [_start('beam_jobs.predict', [*argv, *extra])
            for extra in ([], ['--overwrite'], ['--resume'])]
  for other in others:
    stdout, stderr = other.communicate(timeout=300)
    refusal = _one_error_line(subprocess.CompletedProcess(other.args, other.returncode, stdout,
                                                          stderr))
    assert f'is in use by a predict job (pid {first.pid}' in refusal, refusal
    # Said only while the first job holds the folder: each refusal happened while it ran (the
    # first may end before the last refusal is read; a run after it would not be refused).
    assert 'still running; nothing was touched' in refusal
  _, stderr = first.communicate(timeout=300)
  assert first.returncode == 0, stderr[-3000:]
  assert len(read_jsonl(out / PREDICTIONS)) == 1500
  outputs = _published_files_exist(out)
  assert set(PUBLISHED_LAST[:3]) <= set(outputs) and not (out / UNPUBLISHED_DIR).exists()

  # SIGTERM (what Docker and Kubernetes send): one line, 143, nothing that looks finished.
  killed = _start('beam_jobs.predict', [*argv, '--overwrite'])
  _wait_for_claim(killed, out, settle=2.0)
  killed.send_signal(signal.SIGTERM)
  _, stderr = killed.communicate(timeout=60)
  assert killed.returncode == 143, stderr[-3000:]
  assert 'Traceback' not in stderr
  assert [line for line in stderr.splitlines() if 'terminated' in line] == [
      'predict: terminated (SIGTERM); nothing was published (its manifest is written only when '
      'it finishes). Run it again with --overwrite to start over.']
  assert not any((out / name).exists() for name in (schema.MANIFEST_FILE, *PUBLISHED_LAST))
  # Only a dead run is unfinished: now, and only now, --overwrite is offered.
  refusal = _one_error_line(_command('beam_jobs.predict', argv))
  assert 'holds an unfinished run (killed or failed: no manifest) of predict' in refusal


@pytest.mark.slow
def test_preprocess_refuses_a_folder_another_preprocess_is_writing(tmp_path):
  make_sample(str(tmp_path / 'many'), count=2000, seed=3)
  out = tmp_path / 'prep'
  argv = ['--labels_csv', str(tmp_path / 'many' / 'train_v2.csv'), '--images_dir',
          str(tmp_path / 'many' / 'train-jpg'), '--output_dir', str(out), '--image_size', '32']
  first = _start('beam_jobs.preprocess', argv)
  _wait_for_claim(first, out, settle=0.5)
  refusal = _one_error_line(_command('beam_jobs.preprocess', [*argv, '--overwrite']))
  assert f'is in use by a preprocess job (pid {first.pid}' in refusal, refusal
  _, stderr = first.communicate(timeout=300)
  assert first.returncode == 0, stderr[-3000:]
  _published_files_exist(out)


@pytest.mark.slow
def test_training_refuses_a_job_folder_another_process_holds(tmp_path_factory, tmp_path):
  from tests.conftest_training import cached_prepared
  prepared = cached_prepared(tmp_path_factory, count=40, image_size=32)
  job = tmp_path / 'job'
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from model.folder_claim import hold_folder; '
       'from model.train import JOB_LAYOUT; hold_folder(sys.argv[1], JOB_LAYOUT, "--job_dir"); '
       'print("held", flush=True); time.sleep(120)', str(job)],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    refusal = _one_error_line(_command('model.train', [
        '--data_dir', str(prepared), '--job_dir', str(job), '--export_base',
        str(tmp_path / 'export'), '--epochs', '1']))
    assert f'--job_dir {job} is in use by a train job (pid {holder.pid}' in refusal, refusal
    assert not (job / 'checkpoints').exists() and not (tmp_path / 'export').exists()
  finally:
    holder.kill()
    holder.wait()


# ----------------------------------------------------------------------------- failed runs


@pytest.mark.slow
def test_a_failed_run_leaves_nothing_that_looks_finished(images, export_base, tmp_path):
  folder = tmp_path / 'in'
  shutil.copytree(images, folder)
  (folder / 'broken.jpg').write_bytes(b'not a picture')
  out = tmp_path / 'out'
  argv = _predict_argv(folder, out, export_base / schema.MODEL_NAME)
  refusal = _one_error_line(_command('beam_jobs.predict', [*argv, '--max_bad_fraction', '0']))
  assert 'nothing was published' in refusal and f'{out / UNPUBLISHED_DIR}' in refusal
  assert not any((out / name).exists() for name in (schema.MANIFEST_FILE, *PUBLISHED_LAST))
  summary = json.loads((out / UNPUBLISHED_DIR / schema.SUMMARY_FILE).read_text())
  assert summary['counts'] == {'images_matched': 13, 'predictions': 12, 'dead_letters': 1}

  # --resume over it publishes, no image inferred again; the unpublished folder goes.
  summary = predict.run([*argv, '--resume', '--max_bad_fraction', '0.1'])
  assert summary['counts']['predictions'] == summary['incremental']['resumed'] == 12
  assert set(PUBLISHED_LAST[:3]) <= set(_published_files_exist(out))
  assert not (out / UNPUBLISHED_DIR).exists()


# ----------------------------------------------------------------------------- every input


@pytest.mark.slow
def test_an_unreadable_folder_under_an_input_is_a_dead_letter(images, export_base, tmp_path):
  root = tmp_path / 'in'
  (root / 'open').mkdir(parents=True)
  (root / 'closed').mkdir()
  names = sorted(p.name for p in images.glob('*.jpg'))
  for name in names[:7]:
    shutil.copy(images / name, root / 'open' / name)
  for name in names[7:]:
    shutil.copy(images / name, root / 'closed' / name)
  out = tmp_path / 'out'
  try:
    (root / 'closed').chmod(0)
    done = _command('beam_jobs.predict', _predict_argv(root, out, export_base / schema.MODEL_NAME,
                                                       '--max_bad_fraction', '0.5'),
                    prefix=UNPRIVILEGED)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads((out / schema.MANIFEST_FILE).read_text())['counts']
    assert counts['images_matched'] == 8 == counts['predictions'] + counts['dead_letters']
    assert counts['dead_letter_reasons'] == {'UNREADABLE_FOLDER': 1}
    dead, = read_jsonl(out / schema.DEAD_LETTERS_DIR / '*.jsonl')
    assert dead['path'] == str(root / 'closed') and 'chmod a+rx' in dead['message']

    (root).chmod(0)   # the --input itself: one line before anything runs
    refusal = _one_error_line(_command(
        'beam_jobs.predict', _predict_argv(root, tmp_path / 'out2',
                                           export_base / schema.MODEL_NAME), prefix=UNPRIVILEGED))
    assert f'Permission denied: {root}' in refusal and not (tmp_path / 'out2').exists()
  finally:
    root.chmod(0o755)
    (root / 'closed').chmod(0o755)


# ----------------------------------------------------------------------------- the machine's errors


@pytest.mark.slow
def test_permissions_are_one_line_in_both_jobs(images, export_base, tmp_path):
  tmp_path.chmod(0o755)
  labels = tmp_path / 'labels.csv'
  shutil.copy(images.parent / 'train_v2.csv', labels)
  locked = tmp_path / 'locked'
  locked.mkdir(mode=0o555)
  try:
    labels.chmod(0)
    for module, argv, path in (
        ('beam_jobs.predict', _predict_argv(images, tmp_path / 'p1', export_base / 'PlanetModel',
                                            '--labels_csv', str(labels)), labels),
        ('beam_jobs.predict', _predict_argv(images, locked / 'out', export_base / 'PlanetModel'),
         locked / 'out'),
        ('beam_jobs.preprocess', ['--labels_csv', str(labels), '--images_dir', str(images),
                                  '--output_dir', str(tmp_path / 'p2')], labels),
        ('beam_jobs.preprocess', ['--labels_csv', str(images.parent / 'train_v2.csv'),
                                  '--images_dir', str(images), '--output_dir',
                                  str(locked / 'prep')], locked / 'prep')):
      refusal = _one_error_line(_command(module, argv, prefix=UNPRIVILEGED))
      assert f'Permission denied: {path}. Nothing was published; check that you may' in refusal
  finally:
    labels.chmod(0o644)
    locked.chmod(0o755)


def _on_full_disk(module: str, argv: list[str], mount_at: pathlib.Path,
                  size: str) -> subprocess.CompletedProcess:
  """The command with a tmpfs of `size` mounted at `mount_at`, in a mount namespace of its own
  (nothing outside sees it, and it goes with the command)."""
  mount_at.mkdir()
  script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
  user = [] if os.geteuid() == 0 else ['--map-root-user']
  return subprocess.run(
      ['unshare', '--mount', '--propagation', 'private', *user, 'sh', '-c', script, 'sh', size,
       str(mount_at), sys.executable, '-m', module, *argv], capture_output=True, text=True,
      timeout=300, cwd=REPO, env={**os.environ, 'PYTHONPATH': str(REPO)})


@pytest.mark.slow
def test_a_full_disk_is_one_line_in_every_stage(images, export_base, tmp_path):
  if shutil.which('unshare') is None:
    pytest.fail('util-linux unshare is needed to mount a small tmpfs for this test')
  from model.network import build_model
  checkpoint = tmp_path / 'model.keras'
  build_model(32).save(checkpoint)
  for module, argv, size in (
      ('beam_jobs.preprocess', ['--labels_csv', str(images.parent / 'train_v2.csv'),
                                '--images_dir', str(images), '--output_dir', '{disk}/prep',
                                '--image_size', '64'], '40k'),
      ('beam_jobs.predict', _predict_argv(images, '{disk}/out', export_base / 'PlanetModel'),
       '24k'),
      ('model.export', ['--checkpoint', str(checkpoint), '--export_base', '{disk}/export'],
       '64k')):
    disk = tmp_path / module.replace('.', '_')
    done = _on_full_disk(module, [a.replace('{disk}', str(disk)) for a in argv], disk, size)
    refusal = _one_error_line(done)
    assert re.match(rf'{module.rsplit(".", 1)[1]}: error: No space left on device(: \S+)?\. '
                    'Nothing was published; free some space', refusal), refusal



# ----------------------------------------------------------------------------- paths


@pytest.mark.slow
def test_tilde_means_home_in_every_path_flag(images, export_base, tmp_path):
  home, elsewhere = tmp_path / 'home', tmp_path / 'cwd'
  elsewhere.mkdir()
  shutil.copytree(images, home / 'imgs')
  shutil.copytree(export_base, home / 'export')
  shutil.copy(images.parent / 'train_v2.csv', home / 'labels.csv')
  done = _command('beam_jobs.predict', [
      '--input=~/imgs', '--output_dir=~/out', '--model_dir=~/export/PlanetModel',
      '--labels_csv=~/labels.csv'], env={'HOME': str(home)}, cwd=elsewhere)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (home / 'out' / schema.MANIFEST_FILE).exists() and not list(elsewhere.iterdir())
  # The overlap check sees the path that is written.
  refusal = _one_error_line(_command('beam_jobs.predict', [
      '--input=~/imgs', '--output_dir=~/imgs/out', '--model_dir=~/export/PlanetModel'],
      env={'HOME': str(home)}, cwd=elsewhere))
  assert 'lies inside --input' in refusal and not (home / 'imgs' / 'out').exists()
  done = _command('beam_jobs.preprocess', [
      '--labels_csv=~/labels.csv', '--images_dir=~/imgs', '--output_dir=~/prep',
      '--image_size=32'], env={'HOME': str(home)}, cwd=elsewhere)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (home / 'prep' / schema.MANIFEST_FILE).exists() and not list(elsewhere.iterdir())


@pytest.mark.parametrize('parse,argv', [
    (preprocess.parse_args, ['--labels_csv', 'x.csv', '--images_dir', 'imgs', '--output_dir', '']),
    (predict.parse_args, ['--input', 'imgs', '--output_dir', 'out', '--model_dir', ' ']),
])
def test_an_empty_path_is_refused_not_taken_for_the_working_directory(parse, argv, capsys):
  # An unset shell variable: `--output_dir "$OUT"` with OUT unset. The commands' own parsers,
  # in this process: the one-line form of a refusal is test_user_mistakes.py's.
  with pytest.raises(SystemExit) as exit_info:
    parse(argv)
  assert exit_info.value.code == 2
  error, = capsys.readouterr().err.strip().splitlines()[-1:]
  assert error.endswith('is empty: give a path (an unset shell variable?)'), error


@pytest.mark.parametrize('flag', ['--max_pixels', '--max_file_bytes'])
def test_the_read_limits_are_one_flag_checked_alike_in_both_jobs(flag, tmp_path, capsys):
  from beam_jobs.predict.config import parse_args as predict_args
  line = f'{flag} must be at least 1, not 0'
  with pytest.raises(preprocess.ConfigError, match=line):
    preprocess.validate_config(preprocess.parse_args(
        ['--labels_csv', 'x.csv', '--images_dir', 'i', '--output_dir', 'o', flag, '0'])[0])
  with pytest.raises(SystemExit):
    predict_args(['--input', 'i', '--output_dir', 'o', '--model_dir', 'm', flag, '0'])
  assert capsys.readouterr().err.strip().endswith(line)
  assert not list(tmp_path.iterdir())
