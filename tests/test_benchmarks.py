"""The benchmark harness: its arithmetic, its memory probe, and one tiny run of every section."""
import json
import re
import shutil
import subprocess
import sys

import pytest

from benchmarks import aims, commands, report
from benchmarks import plan as plan_lib


def _run(seconds, rss=100.0):
  return commands.CommandRun(seconds=seconds, peak_rss_mb=rss, max_process_rss_mb=rss, output_tail='')


def test_two_size_figures_separate_start_up_from_per_image_cost():
  plan = plan_lib.PLANS['full']  # 2,000 and 10,000 chips
  # 10 s of start-up, then 200 images/s: T(2000) = 20 s, T(10000) = 60 s.
  figures = plan_lib.two_size_figures(plan, [_run(21), _run(20), _run(19)],
                                      [_run(60), _run(70, rss=130), _run(59)])
  assert figures['images_per_s_steady'] == pytest.approx(200)
  assert figures['startup_s'] == pytest.approx(10)
  assert figures['images_per_s_overall_big'] == pytest.approx(10000 / 60)
  assert figures['images_per_s_overall_small'] == pytest.approx(100)
  assert figures['peak_rss_mb_big'] == 130


def test_two_size_figures_give_no_steady_rate_when_the_big_run_was_not_slower():
  plan = plan_lib.PLANS['tiny']
  figures = plan_lib.two_size_figures(plan, [_run(5)], [_run(4)])
  assert figures['images_per_s_steady'] is None and figures['startup_s'] is None


def test_run_command_sees_the_memory_of_the_whole_process_tree():
  # A parent that starts a child; each holds ~150 MB for a second.
  hold = 'b = bytearray(150 * 2**20); import time; time.sleep(1.5)'
  run = commands.run_command([sys.executable, '-c',
                              f'import subprocess, sys; p = subprocess.Popen([sys.executable, "-c", '
                              f'{hold!r}]); {hold}; p.wait()'])
  assert run.seconds >= 1.5
  assert run.peak_rss_mb >= 290          # both processes, summed
  assert 150 <= run.max_process_rss_mb < 290  # the largest single process


def test_run_command_sees_processes_started_from_other_threads():
  # Beam's multi-processing runner starts its workers from a thread, not the main one.
  hold = 'b = bytearray(150 * 2**20); import time; time.sleep(1.5)'
  run = commands.run_command([sys.executable, '-c',
                              'import subprocess, sys, threading; t = threading.Thread(target='
                              f'lambda: subprocess.run([sys.executable, "-c", {hold!r}])); '
                              't.start(); t.join()'])
  assert run.peak_rss_mb >= 150


def test_run_command_reports_a_failing_command_with_its_output():
  with pytest.raises(subprocess.CalledProcessError) as raised:
    commands.run_command([sys.executable, '-c', 'print("what went wrong"); raise SystemExit(3)'])
  assert raised.value.returncode == 3 and 'what went wrong' in raised.value.output


def _table_is_well_formed(markdown: str) -> None:
  """Every markdown table has a separator line and as many cells on each row as in its header."""
  lines = markdown.splitlines()
  for i, line in enumerate(lines):
    if line.startswith('|') and (i == 0 or not lines[i - 1].startswith('|')):
      cells = line.count('|')
      assert re.fullmatch(r'\|( --- \|)+', lines[i + 1]), lines[i + 1]
      j = i + 1
      while j < len(lines) and lines[j].startswith('|'):
        assert lines[j].count('|') == cells, (line, lines[j])
        j += 1


def _verdicts_follow_the_targets(checked: list[dict]) -> None:
  targets = {aim.id: aim for aim in aims.AIMS}
  for a in checked:
    aim = targets[a['id']]
    if a['measured'] is None:
      assert a['met'] is None, a
    else:
      assert a['met'] == (a['measured'] <= aim.target if aim.lower_is_better
                          else a['measured'] >= aim.target), a


def _renders_every_section_as_tables(markdown: str, checked: list[dict]) -> None:
  """Every section's heading, the aims table with a verdict for each aim, and tables, not prose."""
  for heading in ('## The aims', '## 1. Preprocess', '## 2. Training input', '## 3. Prediction',
                  '## 4. JPEG decode', '## 5. Against the scripts'):
    assert heading in markdown
  aims_table = markdown.split('## The aims')[1].split('## 1.')[0]
  verdicts = re.findall(r'\| (met|not met|n/a) \|$', aims_table, re.MULTILINE)
  assert sorted(verdicts) == sorted(
      {True: 'met', False: 'not met', None: 'n/a'}[a['met']] for a in checked)
  assert not re.search(r'\bissue \d', markdown)
  _table_is_well_formed(markdown)


def test_the_recorded_results_render_again_as_tables(tmp_path):
  # The committed results.json, re-rendered without measuring: every aim checked again.
  recorded = tmp_path / 'results.json'
  shutil.copy(report.__file__.replace('report.py', 'results.json'), recorded)
  report.main([str(recorded)])
  on_disk = json.loads(recorded.read_text())
  assert [a['id'] for a in on_disk['aims']] == [aim.id for aim in aims.AIMS]
  assert all(a['measured'] is not None for a in on_disk['aims'])
  _verdicts_follow_the_targets(on_disk['aims'])
  _renders_every_section_as_tables((tmp_path / 'RESULTS.md').read_text(), on_disk['aims'])


def test_an_aim_without_a_figure_is_not_measured_and_one_below_its_target_is_not_met():
  results = {'predict_vs_script': {'startup_gap_s': None, 'memory': {'growth': 1.0},
                                   'ratios': {'job_in_process_steady_vs_plain_loop': 0.5,
                                              'job_grpc_steady_vs_plain_client': 0.9,
                                              'full_vs_unchanged_cost_per_image': 6.0}}}
  checked = {a['id']: a for a in aims.check_aims(results)}
  assert set(checked) == {'predict_vs_script', 'predict_startup_vs_script', 'grpc_vs_script',
                          'unchanged_folder'}   # memory_at_scale needs preprocess_vs_script too
  assert checked['predict_startup_vs_script']['met'] is None
  assert checked['predict_vs_script']['met'] is False
  assert checked['grpc_vs_script']['met'] is True and checked['unchanged_folder']['met'] is True


@pytest.mark.slow
def test_tiny_run_measures_every_figure_and_renders_the_tables(tmp_path):
  from benchmarks import run
  results = run.main(['--tiny', '--work', str(tmp_path / 'work'), '--out', str(tmp_path / 'out')])
  on_disk = json.loads((tmp_path / 'out' / 'results.json').read_text())
  assert on_disk['plan']['name'] == 'tiny' and on_disk['sections_run'] == list(run.SECTIONS)

  def number(path, may_be_none=False):
    value = on_disk
    for key in path.split('.'):
      assert key in value, f'results.json lacks {path}'
      value = value[key]
    if value is None and may_be_none:   # a steady rate needs the big run to be slower
      return
    assert isinstance(value, (int, float)) and value > 0, (path, value)

  for contender in ('baseline_loop', 'job_in_process', 'job_2_workers'):
    for figure in ('images_per_s_overall_small', 'images_per_s_overall_big', 'bytes_per_image',
                   'peak_rss_mb_small', 'peak_rss_mb_big'):
      number(f'preprocess.{contender}.{figure}')
    number(f'preprocess.{contender}.images_per_s_steady', may_be_none=True)
  assert on_disk['preprocess']['ratios']['job_in_process_bytes_vs_baseline'] == pytest.approx(
      0.25, abs=0.01)   # uint8 against float32 pixels
  for figure in ('sequence_pillow_per_batch', 'tf_data_augmented', 'tf_data_no_augment',
                 'train_step_real_pipeline', 'train_step_in_memory'):
    number(f'training.{figure}.images_per_s')
  for figure in ('tf_data_vs_sequence', 'real_pipeline_vs_in_memory'):
    number(f'training.ratios.{figure}')
  for figure in ('decode_only', 'plain_model_loop', 'float_client', 'serial_limit', 'server_limit'):
    number(f'predict.{figure}.images_per_s')
  for job in ('job_in_process', 'job_grpc'):
    for figure in ('images_per_s_overall_small', 'images_per_s_overall_big', 'peak_rss_mb_small',
                   'peak_rss_mb_big', 'peak_rss_growth'):
      number(f'predict.{job}.{figure}')
    number(f'predict.{job}.images_per_s_steady', may_be_none=True)
  for chips in ('sample',):
    for figure in ('with_draft.images_per_s', 'without_draft.images_per_s', 'draft_speedup'):
      number(f'decode.{chips}.{figure}')
  plan = on_disk['plan']
  prep = on_disk['preprocess_vs_script']
  for contender in ('plain_script', 'job'):
    for figure in ('images_per_s_overall_small', 'images_per_s_overall_big', 'peak_rss_mb_big'):
      number(f'preprocess_vs_script.{contender}.{figure}')
    assert prep[contender]['examples_written_big'] == plan['script_big']   # every chip, both
  assert prep['memory']['examples_written'] == plan['memory_big']
  predict = on_disk['predict_vs_script']
  for contender in ('plain_loop', 'job_in_process', 'job_unchanged', 'plain_grpc_client',
                    'job_grpc'):
    number(f'predict_vs_script.{contender}.images_per_s_overall_big')
    # The unchanged folder again: every row written, every one carried, none inferred.
    said = predict[contender]['said_big']
    assert said['rows'] == plan['big'], contender
    assert said['inferred'] == (0 if contender == 'job_unchanged' else plan['big']), contender
  assert predict['memory']['predicted'] == plan['memory_big']
  number('machine.cpus')
  number('duration_s')
  assert [a['id'] for a in on_disk['aims']] == [aim.id for aim in aims.AIMS]
  _verdicts_follow_the_targets(on_disk['aims'])

  markdown = (tmp_path / 'out' / 'RESULTS.md').read_text()
  _renders_every_section_as_tables(markdown, on_disk['aims'])
  assert results['duration_s'] == on_disk['duration_s']


def test_cli_refuses_sizes_in_the_wrong_order(capsys):
  from benchmarks import run
  with pytest.raises(SystemExit):
    run.parse_args(['--small', '500', '--big', '100'])
  assert 'small < big' in capsys.readouterr().err
