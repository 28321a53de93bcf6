"""Preprocess against the script a user would write instead, not the tutorial's loop.

Usage: python -m benchmarks --only preprocess_vs_script [--quick] [--work /tmp/planet_bench]

Contenders, each a whole command in its own process, interleaved in every repeat, at
`plan.script_small` and `plan.script_big` chips (20,000 and 50,000 in the full plan):
  plain_script:    python -m benchmarks.plain_preprocess: a multiprocessing.Pool over every core,
                   each worker decoding with Pillow and writing its own TFRecord file.
  job:             python -m beam_jobs.preprocess as its user runs it (DirectRunner in its own
                   process, one encoder process per core).
Then one run of the job at `plan.big` chips (10,000) and one at `plan.memory_big` (100,000): the
peak RSS of the second against the first, since a job's memory must not grow with its input.
"""
import dataclasses
import json
import os
import shutil

from benchmarks import commands, workspace
from benchmarks.plan import Plan, ratio, two_size_figures

CONTENDERS = ('plain_script', 'job')


def command(contender: str, chips: str, out: str) -> list[str]:
  csv, images = os.path.join(chips, 'train_v2.csv'), os.path.join(chips, 'train-jpg')
  module = {'plain_script': 'benchmarks.plain_preprocess',
            'job': 'beam_jobs.preprocess'}[contender]
  extra = ('--overwrite',) if contender == 'job' else ()
  return commands.python_module(module, '--labels_csv', csv, '--images_dir', images,
                                '--output_dir', out, *extra)


def _examples_written(contender: str, run: commands.CommandRun, out: str) -> int:
  """How many Examples the contender says it wrote (the job: its manifest; the script: its line)."""
  if contender == 'plain_script':
    return json.loads(run.output_tail.strip().splitlines()[-1])['images']
  with open(os.path.join(out, 'manifest.json'), encoding='utf-8') as f:
    return sum(json.load(f)['counts']['examples'].values())


def _run(contender: str, chips: str, out: str, plan: Plan) -> tuple[commands.CommandRun, int]:
  shutil.rmtree(out, ignore_errors=True)
  run = commands.run_command(command(contender, chips, out), in_process=plan.commands_in_process)
  written = _examples_written(contender, run, out)
  shutil.rmtree(out, ignore_errors=True)
  return run, written


def measure(plan: Plan, work: str, log=print) -> dict:
  sizes = {'small': plan.script_small, 'big': plan.script_big}
  sets = {size: workspace.chips(work, n) for size, n in sizes.items()}
  runs = {c: {'small': [], 'big': []} for c in CONTENDERS}
  written = {}
  for repeat in range(plan.repeats):
    for contender in CONTENDERS:   # interleaved: a change in load reaches both alike
      for size, chips in sets.items():
        out = os.path.join(work, 'runs', f'vs_script_prep_{contender}_{size}')
        run, written[(contender, size)] = _run(contender, chips, out, plan)
        runs[contender][size].append(run)
        log(f'  preprocess vs script {contender:15s} {sizes[size]:>7,} chips run {repeat + 1}: '
            f'{run.seconds:6.1f} s, peak RSS {run.peak_rss_mb:6.0f} MB')
  at_sizes = dataclasses.replace(plan, small=plan.script_small, big=plan.script_big)
  figures = {c: two_size_figures(at_sizes, runs[c]['small'], runs[c]['big']) for c in CONTENDERS}
  for contender in CONTENDERS:
    figures[contender]['examples_written_big'] = written[(contender, 'big')]

  memory_out = os.path.join(work, 'runs', 'vs_script_prep_memory')
  base_run, _ = _run('job', workspace.chips(work, plan.big), memory_out, plan)
  memory_run, memory_written = _run('job', workspace.chips(work, plan.memory_big), memory_out,
                                    plan)
  log(f'  preprocess job {plan.memory_big:,} chips: {memory_run.seconds:6.1f} s, '
      f'peak RSS {memory_run.peak_rss_mb:6.0f} MB (at {plan.big:,}: '
      f'{base_run.peak_rss_mb:6.0f} MB)')
  job, script = figures['job'], figures['plain_script']
  figures['memory'] = {'chips': plan.memory_big, 'seconds': round(memory_run.seconds, 2),
                       'examples_written': memory_written,
                       'peak_rss_mb': memory_run.peak_rss_mb,
                       'against_chips': plan.big,
                       'against_peak_rss_mb': base_run.peak_rss_mb,
                       'growth': ratio(memory_run.peak_rss_mb, base_run.peak_rss_mb)}
  figures['sizes'] = sizes
  figures['ratios'] = {
      'job_steady_vs_script': ratio(job['images_per_s_steady'], script['images_per_s_steady']),
      'job_overall_big_vs_script': ratio(job['images_per_s_overall_big'],
                                         script['images_per_s_overall_big']),
      'job_overall_small_vs_script': ratio(job['images_per_s_overall_small'],
                                           script['images_per_s_overall_small']),
  }
  return figures
