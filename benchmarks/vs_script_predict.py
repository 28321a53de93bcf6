"""Prediction against the scripts a user would write instead, and incremental runs.

Usage: python -m benchmarks --only predict_vs_script [--quick] [--work /tmp/planet_bench]

Contenders, each a whole command in its own process, interleaved in every repeat, at `plan.small`
and `plan.big` chips (2,000 and 10,000 in the full plan), on the same untrained export:
  plain_loop:        python -m benchmarks.plain_predict: the SavedModel loaded in the script, a
                     thread pool decoding ahead with Pillow, batches of 64 to `serving_default`.
  job_in_process:    python -m beam_jobs.predict --model_dir.
  plain_grpc_client: python -m benchmarks.plain_grpc_client: decode ahead, 32 uint8 images per
                     request, 4 requests in flight, to the same server as the job.
  job_grpc:          python -m beam_jobs.predict --serving_address (that server).
  job_unchanged:     python -m beam_jobs.predict --model_dir --previous_output OUT, OUT being the
                     job_in_process run of the same size and repeat: an unchanged folder run
                     again, everything carried over.
The server is `python -m model.serve` in its own process, started once. Then one run of the
in-process job at `plan.memory_big` chips: its peak RSS against the run at `plan.big`.
"""
import json
import os
import shutil

from benchmarks import commands, workspace
from benchmarks.measure_predict import ServerProcess
from benchmarks.plan import Plan, ratio, two_size_figures

CONTENDERS = ('plain_loop', 'job_in_process', 'job_unchanged', 'plain_grpc_client', 'job_grpc')


def command(contender: str, images_dir: str, out: str, version_dir: str, server_address: str,
            previous_output: str | None = None) -> list[str]:
  if contender == 'plain_loop':
    return commands.python_module('benchmarks.plain_predict', '--images_dir', images_dir,
                                  '--model_dir', version_dir, '--output', out)
  if contender == 'plain_grpc_client':
    return commands.python_module('benchmarks.plain_grpc_client', '--images_dir', images_dir,
                                  '--address', server_address, '--output', out)
  backend = {'job_in_process': (), 'job_grpc': ('--serving_address', server_address),
             'job_unchanged': ('--previous_output', previous_output)}[contender]
  return commands.python_module('beam_jobs.predict', '--input', images_dir, '--output_dir', out,
                                '--model_dir', os.path.dirname(version_dir), '--overwrite',
                                *backend)


def _clear(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def _predicted(contender: str, run: commands.CommandRun, out: str) -> dict:
  """What the contender says it did: rows written, and images inferred to write them."""
  if contender.startswith('plain'):
    images = json.loads(run.output_tail.strip().splitlines()[-1])['images']
    return {'rows': images, 'inferred': images}
  with open(os.path.join(out, 'summary.json'), encoding='utf-8') as f:
    summary = json.load(f)
  rows, incremental = summary['counts']['predictions'], summary.get('incremental') or {}
  reused = incremental.get('carried', 0) + incremental.get('resumed', 0)
  return {'rows': rows, 'inferred': rows - reused, 'incremental': incremental}


def measure(plan: Plan, work: str, log=print) -> dict:
  sets = {'small': workspace.chips(work, plan.small, draw_at_least=plan.big),
          'big': workspace.chips(work, plan.big)}
  version_dir = workspace.export(work)
  runs = {c: {'small': [], 'big': []} for c in CONTENDERS}
  said = {}
  with ServerProcess(os.path.dirname(version_dir)) as server:
    for repeat in range(plan.repeats):
      for contender in CONTENDERS:   # interleaved: a change in load reaches all alike
        for size, chips in sets.items():
          out = os.path.join(work, 'runs', f'vs_script_predict_{contender}_{size}')
          full_run = os.path.join(work, 'runs', f'vs_script_predict_job_in_process_{size}')
          _clear(out)
          run = commands.run_command(
              command(contender, os.path.join(chips, 'train-jpg'), out, version_dir,
                      server.address, previous_output=full_run),
              in_process=plan.commands_in_process)
          runs[contender][size].append(run)
          said[(contender, size)] = _predicted(contender, run, out)
          if contender != 'job_in_process':   # kept: the next job_unchanged run reads it
            _clear(out)
          log(f'  predict vs script {contender:17s} {size:5s} run {repeat + 1}: '
              f'{run.seconds:6.1f} s, peak RSS {run.peak_rss_mb:6.0f} MB')
    server_rss = server.rss_mb()
  for size in sets:
    _clear(os.path.join(work, 'runs', f'vs_script_predict_job_in_process_{size}'))

  figures = {c: two_size_figures(plan, runs[c]['small'], runs[c]['big']) for c in CONTENDERS}
  for contender in CONTENDERS:
    figures[contender]['said_big'] = said[(contender, 'big')]
  figures['server_rss_mb'] = server_rss

  memory_out = os.path.join(work, 'runs', 'vs_script_predict_memory')
  _clear(memory_out)
  memory_run = commands.run_command(
      command('job_in_process', os.path.join(workspace.chips(work, plan.memory_big), 'train-jpg'),
              memory_out, version_dir, server.address), in_process=plan.commands_in_process)
  memory_said = _predicted('job_in_process', memory_run, memory_out)
  _clear(memory_out)
  log(f'  predict job {plan.memory_big:,} chips: {memory_run.seconds:6.1f} s, '
      f'peak RSS {memory_run.peak_rss_mb:6.0f} MB')
  job = figures['job_in_process']
  figures['memory'] = {'chips': plan.memory_big, 'seconds': round(memory_run.seconds, 2),
                       'predicted': memory_said['rows'], 'peak_rss_mb': memory_run.peak_rss_mb,
                       'against_chips': plan.big,
                       'growth': ratio(memory_run.peak_rss_mb, job['peak_rss_mb_big'])}

  def steady(name):
    return figures[name]['images_per_s_steady']

  def startup(name):
    return figures[name]['startup_s']

  figures['ratios'] = {
      'job_in_process_steady_vs_plain_loop': ratio(steady('job_in_process'), steady('plain_loop')),
      'job_in_process_overall_big_vs_plain_loop': ratio(
          job['images_per_s_overall_big'], figures['plain_loop']['images_per_s_overall_big']),
      'job_grpc_steady_vs_plain_client': ratio(steady('job_grpc'), steady('plain_grpc_client')),
      'job_grpc_overall_big_vs_plain_client': ratio(
          figures['job_grpc']['images_per_s_overall_big'],
          figures['plain_grpc_client']['images_per_s_overall_big']),
      # Cost per image = 1 / steady rate: full run's cost over the unchanged run's.
      'full_vs_unchanged_cost_per_image': ratio(steady('job_unchanged'), steady('job_in_process')),
  }
  figures['startup_gap_s'] = (startup('job_in_process') - startup('plain_loop')
                              if startup('job_in_process') is not None
                              and startup('plain_loop') is not None else None)
  return figures
