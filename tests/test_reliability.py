"""Reliability and security: jobs killed part-way, corrupt shards, tampered exports, hostile input, TLS.

Each test is a row of RELIABILITY.md (scenario, expected behaviour, measured figure); the figures a
test measures are printed as `RELIABILITY ...` lines (`pytest -s`), so the table can be checked
against a run. Jobs are killed as real commands (`python -m ...` in their own process group, the
whole group sent SIGKILL); everything else runs in-process to stay fast on two shared cores.
"""
import builtins
import io
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
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

# Imported before any test records opened files: a lazy import inside a job would open its own.
import model.tf_example  # noqa: F401  pylint: disable=unused-import
from beam_jobs import make_sample, predict, preprocess
from beam_jobs.common import progress
from model import dataset as dataset_lib
from model import schema, train, train_flags, training_model, verify_data
from model.manifest import ManifestMissing
from model.output_layout import CLAIM_FILE, OutputRefused
from model.serving.local_server import LocalServingServer
from tests import hostile_inputs
from tests.conftest import REPO
from tests.test_serving_handler import make_self_signed_certificate

CHIPS = 300
ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
REFUSED_BEFORE_START = 5.0   # seconds: a refusal that reads no image is far faster than this


def report(scenario: str, **figures) -> None:
  print(f'\nRELIABILITY {scenario}: ' + ', '.join(f'{k}={v}' for k, v in figures.items()))


def files_under(folder: pathlib.Path) -> list[str]:
  """Every file the pipeline wrote below `folder`, relative to it (empty folders left by a killed
  run do not count, nor the claim file written before the pipeline starts)."""
  return sorted(str(pathlib.Path(root, name).relative_to(folder))
                for root, _, names in os.walk(folder) for name in names if name != CLAIM_FILE)


def flip_byte(path: pathlib.Path, position: float = 0.5) -> None:
  data = bytearray(path.read_bytes())
  data[int(len(data) * position)] ^= 0xFF
  path.write_bytes(bytes(data))


def example_names(prep: pathlib.Path) -> dict[str, list[str]]:
  """split -> the image names in that split's shards, read back with tf.data."""
  manifest = json.loads((prep / schema.MANIFEST_FILE).read_text())
  compression = 'GZIP' if manifest['compression'] == 'gzip' else ''
  spec = {schema.KEY_NAME: tf.io.FixedLenFeature([], tf.string)}
  names = {}
  for split, shards in manifest['shards'].items():
    records = tf.data.TFRecordDataset([str(prep / s) for s in shards], compression)
    names[split] = sorted(tf.io.parse_single_example(r, spec)[schema.KEY_NAME].numpy().decode()
                          for r in records)
  return names


def kill_once_output_appears(module_argv: list[str], output_dir: pathlib.Path,
                             log: pathlib.Path, timeout: float = 180.0) -> tuple[float, list[str]]:
  """Runs `python -m ...` in a new process group; SIGKILLs the whole group when OUTPUT_DIR holds
  a file. Returns (seconds from start to the kill, the files present then)."""
  started = time.monotonic()
  with open(log, 'wb') as stderr:
    process = subprocess.Popen([sys.executable, '-m', *module_argv], cwd=REPO, env=ENV,
                               stdout=stderr, stderr=subprocess.STDOUT, start_new_session=True)
  try:
    while True:
      present = files_under(output_dir)
      if present:
        os.killpg(process.pid, signal.SIGKILL)
        break
      if process.poll() is not None:
        pytest.fail(f'{module_argv[0]} ended ({process.returncode}) before writing anything:\n'
                    f'{log.read_text()[-3000:]}')
      if time.monotonic() - started > timeout:
        pytest.fail(f'{module_argv[0]} wrote nothing in {timeout:g} s')
      time.sleep(0.005)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
    process.wait()
  assert process.returncode == -signal.SIGKILL
  return time.monotonic() - started, present


# ----------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope='module')
def chips(tmp_path_factory) -> pathlib.Path:
  """300 generated 256-pixel chips and their labels CSV (read-only)."""
  root = tmp_path_factory.mktemp('chips')
  make_sample.make_sample(str(root), count=CHIPS, seed=29)
  return root


def preprocess_args(chips: pathlib.Path, out: pathlib.Path) -> list[str]:
  # 128 px (the default) and gzip: the shards take long enough to write that a kill polled every
  # 5 ms lands while they are being written, well before the manifest (1.5-1.8 s apart here).
  return ['--labels_csv', str(chips / 'train_v2.csv'), '--images_dir', str(chips / 'train-jpg'),
          '--output_dir', str(out), '--num_shards', '2', '--compression', 'gzip']


@pytest.fixture(scope='module')
def clean_prep(chips, tmp_path_factory):
  """An uninterrupted preprocess run over the chips: (output folder, RunOutcome); read-only."""
  out = tmp_path_factory.mktemp('clean_prep')
  return out, preprocess.run(preprocess_args(chips, out))


# ----------------------------------------------------------------------------- 1. crash mid-job


@pytest.mark.slow
def test_preprocess_killed_mid_job_publishes_nothing_and_a_rerun_equals_a_clean_run(
    chips, clean_prep, tmp_path):
  out = tmp_path / 'prep'
  seconds, present = kill_once_output_appears(
      ['beam_jobs.preprocess', *preprocess_args(chips, out)], out, tmp_path / 'killed.log')
  assert present and not (out / schema.MANIFEST_FILE).exists()

  # Nothing downstream takes the half-written folder, and each says why.
  with pytest.raises(ManifestMissing, match='has no manifest.json: the stage that writes it did '
                                            r'not finish .*Run it again \(with --overwrite\)'):
    train.train(train_flags.parse_args(['--data_dir', str(out),
                                        '--job_dir', str(tmp_path / 'job'),
                                        '--export_base', str(tmp_path / 'export')]))
  assert not (tmp_path / 'job').exists() and not (tmp_path / 'export').exists()
  assert verify_data.main([str(out)]) == 1

  rerun = preprocess.run(preprocess_args(chips, out) + ['--overwrite']).manifest
  clean_out, clean = clean_prep
  assert rerun['counts'] == clean.manifest['counts']
  assert rerun['counts']['examples']['train'] + rerun['counts']['examples']['eval'] == CHIPS
  assert rerun['label_counts'] == clean.manifest['label_counts']
  assert rerun['shards'] == clean.manifest['shards']
  assert example_names(out) == example_names(clean_out)   # the same images, once each
  assert files_under(out) == files_under(clean_out)       # no partial file of the killed run left
  assert verify_data.main([str(out)]) == 0
  report('preprocess killed', killed_after_s=round(seconds, 1), files_at_kill=len(present),
         kinds_at_kill=sorted({p.split('/')[0] for p in present}),
         rerun_examples=rerun['counts']['examples'])


@pytest.mark.slow
def test_predict_killed_mid_job_publishes_nothing_and_a_rerun_equals_a_clean_run(
    chips, export_base, tmp_path):
  def args(out):
    return ['--input', str(chips / 'train-jpg'), '--output_dir', str(out),
            '--model_dir', str(export_base / schema.MODEL_NAME)]
  out = tmp_path / 'predict'
  seconds, present = kill_once_output_appears(['beam_jobs.predict', *args(out)], out,
                                              tmp_path / 'killed.log')
  assert present and not (out / schema.MANIFEST_FILE).exists()
  with pytest.raises(OutputRefused, match='holds an unfinished run .*--overwrite'):
    predict.run(args(out))

  rerun = predict.run(args(out) + ['--overwrite'])
  clean = predict.run(args(tmp_path / 'clean'))
  assert rerun['counts'] == clean['counts'] == {
      'images_matched': CHIPS, 'predictions': CHIPS, 'dead_letters': 0}

  def predicted(folder):
    names = [json.loads(line)['image_name'] for path in sorted(folder.glob('predictions-*.jsonl'))
             for line in path.read_text().splitlines()]
    assert len(names) == len(set(names))
    return sorted(names)
  assert predicted(out) == predicted(tmp_path / 'clean')
  assert files_under(out) == files_under(tmp_path / 'clean')
  assert json.loads((out / schema.MANIFEST_FILE).read_text())['counts']['predictions'] == CHIPS
  report('predict killed', killed_after_s=round(seconds, 1), files_at_kill=len(present),
         rerun_counts=rerun['counts'])


# ----------------------------------------------------------------------------- 2. corrupt shard


@pytest.mark.parametrize('damage', ['bit-flipped', 'truncated'])
def test_a_damaged_shard_stops_training_in_bounded_time_naming_the_file(damage, clean_prep,
                                                                        tmp_path):
  clean_out, clean = clean_prep
  data = pathlib.Path(shutil.copytree(clean_out, tmp_path / 'prep'))
  shard = data / clean.manifest['shards']['train'][1]
  if damage == 'bit-flipped':
    flip_byte(shard)
  else:   # cut at a record boundary or not, gzip's trailer is gone either way
    shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
  job = tmp_path / 'job'
  args = train_flags.parse_args(['--data_dir', str(data), '--job_dir', str(job), '--export_base',
                                 str(tmp_path / 'export'), '--epochs', '1', '--progress', 'none'])
  started = time.monotonic()
  with pytest.raises(dataset_lib.CorruptShard, match=re.escape(str(shard))) as refused:
    train.train(args)
  seconds = time.monotonic() - started
  assert 'run the preprocess job again' in str(refused.value)
  assert seconds < 30, seconds
  assert not training_model.list_checkpoints(str(job)) and not (tmp_path / 'export').exists()
  report(f'training on a {damage} gzip shard', refused_after_s=round(seconds, 2),
         examples=sum(clean.manifest['counts']['examples'].values()))


@pytest.mark.slow
def test_verify_data_names_every_bad_shard_and_passes_a_good_folder(clean_prep, tmp_path, capsys):
  clean_out, clean = clean_prep
  started = time.monotonic()
  assert verify_data.main([str(clean_out)]) == 0
  seconds = time.monotonic() - started
  (line,) = capsys.readouterr().out.splitlines()
  assert line.startswith(f'verify_data: {clean_out}: OK, 4 shards, {CHIPS} examples')

  bad = pathlib.Path(shutil.copytree(clean_out, tmp_path / 'bad'))
  flipped = bad / clean.manifest['shards']['train'][0]
  flip_byte(flipped)
  truncated = bad / clean.manifest['shards']['eval'][1]
  truncated.write_bytes(truncated.read_bytes()[:-500])
  done = subprocess.run([sys.executable, '-m', 'model.verify_data', str(bad)], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1, done.stderr[-2000:]
  lines = [l for l in done.stderr.splitlines() if l.startswith('verify_data:')]
  assert len(lines) == 3, lines   # one line per bad shard, then the summary
  assert lines[0].startswith(f'verify_data: BAD shard {flipped} cannot be read to its end')
  assert lines[1].startswith(f'verify_data: BAD shard {truncated} ')
  assert re.fullmatch(rf'verify_data: {bad}: BAD, 2 of 4 shards bad, 2 problems \(\d+\.\d s\)',
                      lines[2])

  # Intact shards that hold another count than the manifest records are refused too.
  counted = pathlib.Path(shutil.copytree(clean_out, tmp_path / 'counted'))
  manifest = json.loads((counted / schema.MANIFEST_FILE).read_text())
  manifest['counts']['examples']['eval'] += 1
  (counted / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
  assert verify_data.main([str(counted)]) == 1
  assert 'the eval shards' in capsys.readouterr().err
  report('verify_data', good_folder_s=round(seconds, 2), examples=CHIPS, shards=4,
         bad_files_named=2)


# ----------------------------------------------------------------------------- 3. export integrity


def rewrite_checksums(version_dir: pathlib.Path) -> None:
  """Makes SHA256SUMS agree with the files again, as a consistent but different export would."""
  import hashlib
  lines = []
  for path in sorted(version_dir.rglob('*')):
    relative = str(path.relative_to(version_dir))
    if path.is_file() and relative != schema.EXPORT_CHECKSUMS_FILE:
      lines.append(f'{hashlib.sha256(path.read_bytes()).hexdigest()}  {relative}')
  (version_dir / schema.EXPORT_CHECKSUMS_FILE).write_text('\n'.join(lines) + '\n')


def without_serving_default(version_dir: pathlib.Path) -> None:
  """A complete, self-consistent export whose only uint8 signature is not `serving_default`."""
  pb = version_dir / 'saved_model.pb'
  pb.write_bytes(pb.read_bytes().replace(b'serving_default', b'serving_other__'))
  rewrite_checksums(version_dir)


def flip_variables(version_dir: pathlib.Path) -> None:
  flip_byte(next((version_dir / 'variables').glob('variables.data-*')))


def drop_variables_index(version_dir: pathlib.Path) -> None:
  (version_dir / 'variables' / 'variables.index').unlink()


def drop_checksums(version_dir: pathlib.Path) -> None:
  (version_dir / schema.EXPORT_CHECKSUMS_FILE).unlink()


EXPORT_DAMAGE = {
    # name: (damage, what the refusal says)
    'a flipped byte in the variables': (
        flip_variables, r'2 cannot be used: variables/variables.data-\S+ does not match its '
                        r'checksum in assets.extra/SHA256SUMS'),
    'a partial copy (no variables.index)': (
        drop_variables_index, '2 cannot be used: variables/variables.index is missing'),
    'no serving_default': (
        without_serving_default, r"2 has no signature 'serving_default'; it has "
                                 r"\['predict_float', 'serving_other__', 'serving_tta'\]"),
    'no SHA256SUMS': (drop_checksums, '2 cannot be used: no assets.extra/SHA256SUMS'),
}


@pytest.mark.parametrize('damage', sorted(EXPORT_DAMAGE))
def test_the_in_process_job_refuses_a_bad_version_before_reading_an_image(
    damage, export_base, chips, tmp_path, capsys, monkeypatch):
  base = tmp_path / schema.MODEL_NAME
  shutil.copytree(export_base / schema.MODEL_NAME / '1', base / '1')
  shutil.copytree(base / '1', base / '2')
  make_damage, message = EXPORT_DAMAGE[damage]
  make_damage(base / '2')
  images_read = []
  real_open = FileSystems.open
  monkeypatch.setattr(FileSystems, 'open', staticmethod(
      lambda path, *a, **k: (images_read.append(path) if path.endswith('.jpg') else None)
      or real_open(path, *a, **k)))
  out = tmp_path / 'out'
  started = time.monotonic()
  with pytest.raises(SystemExit):
    predict.main(['--input', str(chips / 'train-jpg'), '--output_dir', str(out),
                  '--model_dir', str(base)])
  seconds = time.monotonic() - started
  assert re.search(message, capsys.readouterr().err)
  assert not out.exists() and not images_read
  assert seconds < REFUSED_BEFORE_START
  report(f'in-process export with {damage}', refused_after_s=round(seconds, 2))


@pytest.mark.slow
def test_the_server_never_serves_a_partial_or_tampered_copy_and_the_job_checks_the_signature(
    export_base, chips, tmp_path, capsys):
  source = export_base / schema.MODEL_NAME / '1'
  base = tmp_path / schema.MODEL_NAME
  shutil.copytree(source, base / '1')
  polls = 0.2
  with LocalServingServer(str(base), poll_seconds=polls) as server:
    assert server.served_version == 1
    # Version 2 is being copied file by file: everything but variables.index has landed.
    shutil.copytree(source, base / '2', ignore=shutil.ignore_patterns('variables.index'))
    time.sleep(5 * polls)
    assert server.served_version == 1 and 2 not in server.repository.states()

    # The copy completes: version 2 is served from the next poll on.
    started = time.monotonic()
    shutil.copy(source / 'variables' / 'variables.index', base / '2' / 'variables')
    while server.served_version != 2:
      assert time.monotonic() - started < 15, 'the completed version 2 was never served'
      time.sleep(0.05)
    pickup = time.monotonic() - started

    # Version 3 has a byte that differs from its checksum: never loaded, 2 keeps serving.
    shutil.copytree(source, base / '3')
    flip_variables(base / '3')
    time.sleep(5 * polls)
    assert server.served_version == 2 and 3 not in server.repository.states()

    # Version 4 is complete and consistent but has no serving_default. TF Serving loads such a
    # version, and so does this server; the job's check before its pipeline refuses it.
    shutil.copytree(source, base / '4')
    without_serving_default(base / '4')
    started = time.monotonic()
    while server.served_version != 4:
      assert time.monotonic() - started < 15, 'version 4 was never loaded'
      time.sleep(0.05)
    out = tmp_path / 'out'
    with pytest.raises(SystemExit):
      predict.main(['--input', str(chips / 'train-jpg'), '--output_dir', str(out),
                    '--serving_address', server.address])
    assert (f"{schema.MODEL_NAME} version 4 at {server.address} has no signature "
            "'serving_default'") in capsys.readouterr().err
    assert not out.exists() and server.predict_request_bytes == []
  report('server and partial/tampered versions', completed_copy_served_after_s=round(pickup, 2),
         poll_s=polls)


# ----------------------------------------------------------------------------- 4. hostile input


@pytest.fixture
def record_opened_paths(monkeypatch):
  """Call it to record, from then to the test's end, every path opened through Beam's FileSystems
  (open, create), Python's open (builtins and io) and os.open (how image files are read); it
  returns the list it fills."""
  def start() -> list[tuple[str, object]]:
    opened = []

    def recording(kind, real):
      def wrapper(path, *args, **kwargs):
        # os.open of a folder is shutil.rmtree clearing Beam's own temporary folder, not a read.
        if not (kind == 'os.open' and os.path.isdir(path)):
          opened.append((kind, path))
        return real(path, *args, **kwargs)
      return wrapper

    for owner, name, wrap in ((FileSystems, 'open', staticmethod),
                              (FileSystems, 'create', staticmethod),
                              (builtins, 'open', None), (io, 'open', None), (os, 'open', None)):
      wrapper = recording(f'{owner.__name__}.{name}', getattr(owner, name))
      monkeypatch.setattr(owner, name, wrap(wrapper) if wrap else wrapper)
    return opened
  return start


def hostile_rows(outside: pathlib.Path) -> list[tuple[bytes, str]]:
  """(raw CSV line, the reason code it must be refused with)."""
  stem = str(outside / 'secret').encode()   # outside/secret.jpg is a real JPEG: worth stealing
  return [
      (b'../outside/secret,clear primary', 'BAD_IMAGE_NAME'),       # path traversal
      (b'..\\outside\\secret,clear primary', 'BAD_IMAGE_NAME'),     # the Windows spelling
      (stem + b',clear primary', 'BAD_IMAGE_NAME'),                 # an absolute path
      (b'file://' + stem + b',clear primary', 'BAD_IMAGE_NAME'),    # URL schemes
      (b'gs://planet-bucket/secret,clear primary', 'BAD_IMAGE_NAME'),
      (b'https://example.com/secret,clear primary', 'BAD_IMAGE_NAME'),
      (b'C:secret,clear primary', 'BAD_IMAGE_NAME'),                # a drive letter
      (b'.secret,clear primary', 'BAD_IMAGE_NAME'),                 # a hidden file
      (b'bell\x07secret,clear primary', 'BAD_IMAGE_NAME'),          # control characters
      (b'nul\x00secret,clear primary', 'BAD_IMAGE_NAME'),
      (b'A' * 1_000_000 + b',clear primary', 'MALFORMED_ROW'),      # a 1 MB name
      (b'big_tags,' + b'clear ' * 175_000, 'MALFORMED_ROW'),        # a 1 MB tags field
      (b'caf\xe9_secret,clear primary', 'MALFORMED_ROW'),           # Latin-1, not UTF-8
      (b'bomb,clear primary', 'TOO_MANY_PIXELS'),                   # a decompression bomb
  ]


def is_inside(path: str, folder: pathlib.Path) -> bool:
  folder = os.path.realpath(folder)
  return os.path.commonpath([path, folder]) == folder


def test_hostile_csv_rows_are_refused_by_reason_and_no_file_outside_is_opened(
    small_sample, tmp_path, record_opened_paths):
  images, outside, out = tmp_path / 'images', tmp_path / 'outside', tmp_path / 'out'
  shutil.copytree(small_sample / 'train-jpg', images)
  outside.mkdir()
  shutil.copy(images / 'train_0.jpg', outside / 'secret.jpg')
  (images / 'bomb.jpg').write_bytes(hostile_inputs.png_declaring(50_000, 50_000))
  good = (small_sample / 'train_v2.csv').read_bytes().rstrip(b'\n').split(b'\n')
  rows = hostile_rows(outside)
  labels_csv = tmp_path / 'labels.csv'
  labels_csv.write_bytes(b'\n'.join(good + [line for line, _ in rows]) + b'\n')
  expected = {len(good) + 1 + i: reason for i, (_, reason) in enumerate(rows)}   # CSV line -> reason

  recorded = record_opened_paths()
  # In this process (--direct_num_workers=1: the encoder's threads), where the recorder sees every
  # open; encoder processes run the same reading code (beam_jobs/common/image_files.py).
  outcome = preprocess.run(['--labels_csv', str(labels_csv), '--images_dir', str(images),
                            '--output_dir', str(out), '--image_size', '32',
                            '--max_bad_fraction', '0.25', '--direct_num_workers=1'])
  opened = list(recorded)

  paths = [(kind, os.path.realpath(os.fspath(path))) for kind, path in opened
           if not isinstance(path, int)]   # an int is a file descriptor, not a path
  # Besides the inputs and the output, only the job's own progress counts (a temporary folder),
  # and what the kernel says of this process (the output claim's owner: /proc/self/stat, boot id).
  outside_allowed = [(kind, path) for kind, path in paths
                     if not (path == os.path.realpath(labels_csv) or is_inside(path, images)
                             or is_inside(path, out) or os.path.basename(os.path.dirname(
                                 path)).startswith(progress.TALLY_FOLDER_PREFIX)
                             or path in (f'/proc/{os.getpid()}/stat',
                                         '/proc/sys/kernel/random/boot_id'))]
  assert outside_allowed == []
  # The recorder saw the job's reads, so its silence about other paths means something.
  read = {path for kind, path in paths if kind in ('FileSystems.open', 'os.open')}
  assert {os.path.realpath(p) for p in (labels_csv, images / 'train_0.jpg',
                                         images / 'bomb.jpg')} <= read
  assert not any('secret' in path for _, path in paths)
  counts = outcome.manifest['counts']   # the job completed: 14 of 74 rows is under 25%
  assert counts['csv_rows'] == len(good) - 1 + len(rows)
  assert counts['examples']['train'] + counts['examples']['eval'] == len(good) - 1
  assert counts['dead_letters'] == {'BAD_IMAGE_NAME': 10, 'MALFORMED_ROW': 3,
                                    'TOO_MANY_PIXELS': 1}
  letters = [json.loads(line) for path in sorted((out / 'dead_letters').glob('*.jsonl'))
             for line in path.read_text().splitlines()]
  assert {r['line']: r['reason'] for r in letters} == expected
  assert all(len(json.dumps(r)) < 2000 for r in letters)   # a 1 MB field is not copied along

  report('hostile CSV', rows=len(rows), refused=len(letters), good_rows=len(good) - 1,
         files_opened=len(paths), opened_outside=len(outside_allowed))


# ----------------------------------------------------------------------------- 5. transport


def test_plaintext_to_a_remote_host_is_refused_before_any_connection(chips, tmp_path, capsys):
  out = tmp_path / 'out'
  started = time.monotonic()
  with pytest.raises(SystemExit):
    predict.main(['--input', str(chips / 'train-jpg'), '--output_dir', str(out),
                  '--serving_address', '10.0.0.7:8500'])
  seconds = time.monotonic() - started
  assert 'refusing a plaintext gRPC channel to 10.0.0.7' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    predict.main(['--input', str(chips / 'train-jpg'), '--output_dir', str(out),
                  '--serving_address', '10.0.0.7:8500', '--tls', '--allow_insecure'])
  assert 'contradict each other' in capsys.readouterr().err
  assert not out.exists() and seconds < REFUSED_BEFORE_START


@pytest.mark.slow
def test_the_predict_command_over_tls_with_a_private_root_certificate(
    export_base, small_sample, tmp_path):
  key, certificate = make_self_signed_certificate()
  root_cert = tmp_path / 'ca.pem'
  root_cert.write_bytes(certificate)
  out = tmp_path / 'out'
  with LocalServingServer(str(export_base / schema.MODEL_NAME), ssl_key=key,
                          ssl_cert=certificate) as server:
    address = f'localhost:{server.port}'
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, '-m', 'beam_jobs.predict', '--input', str(small_sample / 'train-jpg'),
         '--output_dir', str(out), '--serving_address', address, '--tls',
         '--root_cert', str(root_cert), '--model_dir', str(export_base / schema.MODEL_NAME)],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    requests = len(server.predict_request_bytes)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['backend'] == 'grpc'
  assert summary['counts'] == {'images_matched': 60, 'predictions': 60, 'dead_letters': 0}
  manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
  assert manifest['model']['serving_address'] == address and manifest['options']['tls'] is True
  assert requests >= 1
  report('predict over TLS', images=60, requests=requests, command_s=round(seconds, 1))
