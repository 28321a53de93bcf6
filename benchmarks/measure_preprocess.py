"""Preprocess: the Beam job (as it runs by default, and on 2 Beam workers) beside the tutorial-era loop.

Usage: python -m benchmarks --only preprocess [--quick] [--work /tmp/planet_bench]
       (the same figures as the preprocess part of `python -m benchmarks`)

Every contender is run as its user runs it, a whole command in its own process, at two sizes:
  baseline_loop:   python -m benchmarks.preprocess_baseline (one process: full-size Pillow decode,
                   resize, float32, float_list Examples through one tf.io.TFRecordWriter).
  job_in_process:  python -m beam_jobs.preprocess, DirectRunner in this process, one encoder
                   process per core (the default).
  job_2_workers:   the same with --direct_running_mode=multi_processing --direct_num_workers=2.
Bytes per image: the job's TFRecord shards and the baseline's file, from the big run.
The big in-process output is kept (WORK/runs/prep_big) for the training-input figures.
"""
import json
import os
import shutil

from benchmarks import commands, workspace
from benchmarks.plan import Plan, ratio, two_size_figures

MULTI_PROCESSING_2 = ('--direct_running_mode=multi_processing', '--direct_num_workers=2')
CONTENDERS = ('baseline_loop', 'job_in_process', 'job_2_workers')


def prepared_dir(work: str) -> str:
  """The big in-process job's output, read by the training section."""
  return os.path.join(work, 'runs', 'prep_big')


def command(contender: str, chips: str, out: str) -> list[str]:
  csv, images = os.path.join(chips, 'train_v2.csv'), os.path.join(chips, 'train-jpg')
  if contender == 'baseline_loop':
    return commands.python_module('benchmarks.preprocess_baseline', '--labels_csv', csv,
                                  '--images_dir', images, '--output', out)
  extra = MULTI_PROCESSING_2 if contender == 'job_2_workers' else ()
  return commands.python_module('beam_jobs.preprocess', '--labels_csv', csv, '--images_dir',
                                images, '--output_dir', out, '--overwrite', *extra)


def _output_bytes(contender: str, out: str) -> int:
  if contender == 'baseline_loop':
    return os.path.getsize(out)
  with open(os.path.join(out, 'manifest.json'), encoding='utf-8') as f:
    manifest = json.load(f)
  return sum(os.path.getsize(os.path.join(out, p))
             for paths in manifest['shards'].values() for p in paths)


def _clear(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def measure(plan: Plan, work: str, log=print) -> dict:
  sets = {'small': workspace.chips(work, plan.small, draw_at_least=plan.big),
          'big': workspace.chips(work, plan.big)}
  runs = {c: {'small': [], 'big': []} for c in CONTENDERS}
  output_bytes = {}
  for repeat in range(plan.repeats):
    # Contenders interleaved, so a change in the machine's load touches all of them alike.
    for contender in CONTENDERS:
      for size, chips in sets.items():
        out = (prepared_dir(work) if (contender, size) == ('job_in_process', 'big') else
               os.path.join(work, 'runs', f'prep_{contender}_{size}'))
        _clear(out)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        run = commands.run_command(command(contender, chips, out),
                                   in_process=plan.commands_in_process)
        runs[contender][size].append(run)
        log(f'  preprocess {contender:15s} {size:5s} run {repeat + 1}: {run.seconds:6.1f} s, '
            f'peak RSS {run.peak_rss_mb:6.0f} MB')
        if size == 'big':
          output_bytes[contender] = _output_bytes(contender, out)
        if out != prepared_dir(work):
          _clear(out)   # the baseline's float32 records would fill the disk over the repeats
  figures = {c: {**two_size_figures(plan, runs[c]['small'], runs[c]['big']),
                 'bytes_per_image': output_bytes[c] / plan.big} for c in CONTENDERS}
  base = figures['baseline_loop']
  figures['ratios'] = {
      f'{c}_{kind}_vs_baseline': ratio(figures[c][key], base[key])
      for c in ('job_in_process', 'job_2_workers')
      for kind, key in (('steady', 'images_per_s_steady'), ('overall', 'images_per_s_overall_big'),
                        ('bytes', 'bytes_per_image'))}
  return figures
