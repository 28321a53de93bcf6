"""A quiet terminal: third-party chatter is hidden from every command, real messages are not, and
--verbose / PLANET_VERBOSE=1 show everything again."""
import os
import re
import subprocess
import sys

import pytest

from model import third_party_logs
from tests.conftest import REPO

# A line that TensorFlow, absl, CUDA or Beam's internals printed: none may reach a user's terminal.
THIRD_PARTY_LINE = re.compile(
    r'^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]'         # absl / TensorFlow C++
    r'|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] \S+:\d+\]'  # TensorFlow's older format
    r'|WARNING: All log messages before absl'
    r'|(?:INFO|WARNING):(?:apache_beam|tensorflow|absl|root:Resource module)'
    r'|.*(?:cuInit|cudart_stub|oneDNN|semi_persistent_directory|Discarding unparseable args'
    r'|Resource module is not available|rebuild TensorFlow with the appropriate compiler)).*$',
    re.MULTILINE)

# Seen in a run of ./run_local.sh before the filters (issue 17), one of each kind.
CHATTER = [
    'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR',
    'I0000 00:00:1796075203.914258   12069 port.cc:153] oneDNN custom operations are on. You may '
    'see slightly different numerical results due to floating-point round-off errors.',
    'I0000 00:00:1796075203.915374   12069 cudart_stub.cc:31] Could not find cuda drivers on your '
    'machine, GPU will not be used.',
    'E0000 00:00:1796075216.040412   12248 cuda_platform.cc:52] failed call to cuInit: INTERNAL: '
    'CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)',
    'E0000 00:00:1796075217.082880   12248 util.cc:131] oneDNN supports DT_UINT8 only on platforms '
    'with AVX-512. Falling back to the default Eigen-based implementation if present.',
    'I0000 00:00:1796075856.980734   24994 cpu_feature_guard.cc:227] This TensorFlow binary is '
    'optimized to use available CPU instructions in performance-critical operations.',
    'To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild '
    'TensorFlow with the appropriate compiler flags.',
    '2025-09-17 14:44:05.157831: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] Could not '
    'find cuda drivers on your machine, GPU will not be used.',
    'Worker: severity: WARN timestamp {   seconds: 1796075202 } message: "No '
    'semi_persistent_directory found:  User registered objects may not be effective"',
    'Worker: severity: WARN message: "Discarding unparseable args: [\'--pipeline_type_check\']"',
    'Resource module is not available for current platform, memory usage cannot be fetched.',
]
REAL = [
    'E0000 00:00:1796075217.082880   12248 mkl_util.cc:7] an error that is not on the list',
    'F0000 00:00:1796075217.082880   12248 tensor.cc:9] Check failed: shape.ok()',
    'Traceback (most recent call last):',
    'batch of 64 failed (out of memory); predicting one by one',
    'predict: 40/40 images (100%), 33.2/s, 0:00:00 left',
]


def test_chatter_is_recognised_and_real_messages_are_not():
  assert [line for line in CHATTER if not third_party_logs.is_noise(line)] == []
  assert [line for line in REAL if third_party_logs.is_noise(line)] == []
  assert all(THIRD_PARTY_LINE.search(line) for line in CHATTER)


def test_the_filter_passes_every_other_line_in_order(tmp_path):
  source = tmp_path / 'stderr'
  source.write_bytes('\n'.join(CHATTER[:3] + REAL[:1] + CHATTER[3:] + REAL[1:]).encode()
                     + b'\nno newline at the end')
  sink = tmp_path / 'kept'
  with open(source, 'rb') as f, open(sink, 'wb') as g:
    third_party_logs.pass_lines_except_noise(f.fileno(), g.fileno())
  assert sink.read_text().splitlines() == REAL + ['no newline at the end']


def _command(*args, verbose_env=False):
  # As a user's shell has it: none of the settings the tests themselves make.
  environment = {name: value for name, value in os.environ.items()
                 if name not in ('PLANET_VERBOSE', 'TF_CPP_MIN_LOG_LEVEL')}
  if verbose_env:
    environment['PLANET_VERBOSE'] = '1'
  return subprocess.run([sys.executable, *args], cwd=REPO, env=environment, capture_output=True,
                        text=True, timeout=120, check=False)


def _third_party_lines(text):
  return [m.group(0) for m in THIRD_PARTY_LINE.finditer(text)]


@pytest.mark.slow
def test_a_command_loading_tensorflow_is_quiet_and_verbose_shows_the_chatter_again():
  # model.export loads TensorFlow as it starts, and fails on a missing checkpoint: a real error.
  args = ['-m', 'model.export', '--checkpoint', 'missing.keras', '--export_base', '/nonexistent']
  quiet = _command(*args)
  assert quiet.returncode == 1
  assert _third_party_lines(quiet.stdout + quiet.stderr) == []
  assert quiet.stderr.startswith('export: error:'), quiet.stderr

  for verbose in (_command(*args, '--verbose'), _command(*args, verbose_env=True)):
    assert verbose.returncode == 1
    shown = _third_party_lines(verbose.stderr)
    assert any('absl::InitializeLog' in line for line in shown), verbose.stderr
    assert 'export: error:' in verbose.stderr


def test_c_level_lines_pass_the_filter_even_when_the_process_dies_at_once():
  code = ('from model import command_line; import os; command_line.quiet_third_party([]); '
          f'os.write(2, {CHATTER[1]!r}.encode() + b"\\n"); '
          f'os.write(2, {REAL[1]!r}.encode() + b"\\n"); os._exit(3)')
  died = _command('-c', code)
  assert died.returncode == 3
  assert died.stderr.splitlines() == [REAL[1]]


@pytest.mark.slow
def test_every_command_accepts_verbose():
  for module in ('beam_jobs.preprocess', 'beam_jobs.predict', 'beam_jobs.make_sample',
                 'beam_jobs.compare_predictions', 'model.train', 'model.export',
                 'model.verify_data'):
    done = _command('-m', module, '--help')
    assert done.returncode == 0 and '--verbose' in done.stdout, (module, done.stderr[-500:])
    assert _third_party_lines(done.stdout + done.stderr) == [], module
