"""The benchmark driver: every stage measured in one run, on the same chips, written as a table.

Usage: python -m benchmarks [--quick | --tiny] [--work /tmp/planet_bench] [--out DIR]
                            [--only decode,preprocess,training,predict,
                                    preprocess_vs_script,predict_vs_script]

  (default) the full run: 2,000 and 10,000 chips, 3 runs of every figure (preprocess against
            the plain script at 20,000 and 50,000, and each job's memory at 100,000); writes
            benchmarks/RESULTS.md and benchmarks/results.json.
  --quick   300 and 1,500 chips (1,500 and 6,000 for preprocess against the plain script), 1 run
            each (a few minutes); writes to WORK/quick/.
  --tiny    8 and 24 chips, each command's main() called in this process: tests the harness
            (its figures mean nothing); writes to WORK/tiny/.
  --small, --big, --repeats override a preset's sizes (and then write to WORK/<preset>_custom/
            unless --out says where).

Generated chips and the export are cached under --work and reused by later runs. The machine's
load average is sampled every 5 s during the run and recorded beside the figures: other work on
the same cores slows every figure, which is why each comparison is a ratio of figures taken in
the same run, with the contenders interleaved.
"""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time

from benchmarks import (aims, measure_decode, measure_predict, measure_preprocess,
                        measure_training, report, vs_script_predict, vs_script_preprocess,
                        workspace)
from benchmarks.plan import PLANS

# Each section's module measures it; `python -m benchmarks --only NAME` runs one of them.
MEASURES = {'decode': measure_decode, 'preprocess': measure_preprocess,
            'training': measure_training, 'predict': measure_predict,
            'preprocess_vs_script': vs_script_preprocess, 'predict_vs_script': vs_script_predict}
SECTIONS = tuple(MEASURES)
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def machine() -> dict:
  """Cores, memory and the versions every figure depends on."""
  import apache_beam  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  import numpy  # pylint: disable=import-outside-toplevel
  import PIL  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  facts = {'cpus': os.cpu_count(), 'cpus_usable': len(os.sched_getaffinity(0)),
           'platform': platform.platform(), 'python': platform.python_version(),
           'tensorflow': tf.__version__, 'keras': keras.__version__,
           'apache_beam': apache_beam.__version__, 'pillow': PIL.__version__,
           'numpy': numpy.__version__}
  try:
    with open('/proc/meminfo', encoding='ascii') as f:
      total_kb = int(next(line for line in f if line.startswith('MemTotal')).split()[1])
    facts['memory_gib'] = round(total_kb / 2**20, 1)
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      facts['cpu_model'] = next((line.split(':', 1)[1].strip() for line in f
                                 if line.startswith('model name')), 'unknown')
  except OSError:
    pass
  return facts


class LoadSampler:
  """The 1-minute load average every `every` seconds while the benchmark runs."""

  def __init__(self, every: float = 5.0):
    self.samples: list[float] = []
    self._every = every
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True)

  def _loop(self):
    while True:
      self.samples.append(os.getloadavg()[0])
      if self._stop.wait(self._every):
        return

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc_info):
    self._stop.set()
    self._thread.join()

  def summary(self) -> dict:
    values = self.samples or [os.getloadavg()[0]]
    return {'min': min(values), 'median': statistics.median(values), 'max': max(values),
            'samples': len(values)}


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m benchmarks',
                                   description=__doc__.split('\n')[0])
  preset = parser.add_mutually_exclusive_group()
  preset.add_argument('--quick', action='store_true', help='small sizes, one run of each figure')
  preset.add_argument('--tiny', action='store_true', help='a few dozen chips: tests the harness')
  parser.add_argument('--work', default='/tmp/planet_bench',
                      help='cache of generated chips and the export, and scratch outputs')
  parser.add_argument('--out', help='where RESULTS.md and results.json go')
  parser.add_argument('--only', help=f'comma-separated sections of {",".join(SECTIONS)}')
  parser.add_argument('--small', type=int)
  parser.add_argument('--big', type=int)
  parser.add_argument('--repeats', type=int)
  args = parser.parse_args(argv)
  plan = PLANS['tiny' if args.tiny else 'quick' if args.quick else 'full']
  overrides = {k: getattr(args, k) for k in ('small', 'big', 'repeats') if getattr(args, k)}
  if overrides:
    plan = dataclasses.replace(plan, name=f'{plan.name}+custom', **overrides)
  if not 0 < plan.small < plan.big:
    parser.error(f'need 0 < small < big, got {plan.small} and {plan.big}')
  sections = SECTIONS
  if args.only:
    sections = tuple(s.strip() for s in args.only.split(',') if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
      parser.error(f'unknown section(s) {unknown}; choose from {SECTIONS}')
  if args.out is None:
    complete = plan.name == 'full' and sections == SECTIONS
    args.out = PACKAGE_DIR if complete else os.path.join(
        args.work, plan.name.replace('+', '_') + ('' if sections == SECTIONS else '_partial'))
  return args, plan, sections


def main(argv=None) -> dict:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  args, plan, sections = parse_args(sys.argv[1:] if argv is None else argv)
  started = time.perf_counter()
  results = {'plan': plan.describe(), 'sections_run': list(sections),
             'started_at': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
             'command': 'python -m benchmarks ' + ' '.join(sys.argv[1:] if argv is None else argv),
             'machine': machine(), 'load_average_at_start': os.getloadavg(),
             'section_seconds': {}}
  print(f'benchmarks: plan {plan.name} ({plan.small} and {plan.big} chips, {plan.repeats} '
        f'run(s) of each figure), work {args.work}, load average {os.getloadavg()[0]:.2f}',
        flush=True)
  with LoadSampler() as load:
    generation_started = time.perf_counter()
    workspace.chips(args.work, plan.small, draw_at_least=plan.big)
    workspace.chips(args.work, plan.big)
    workspace.export(args.work)
    results['section_seconds']['data_and_export'] = time.perf_counter() - generation_started
    for section in sections:
      module = MEASURES[section]
      section_started = time.perf_counter()
      print(f'benchmarks: {section}', flush=True)
      results[section] = module.measure(plan, args.work, log=lambda text: print(text, flush=True))
      results['section_seconds'][section] = time.perf_counter() - section_started
  results['load_average'] = load.summary()
  results['duration_s'] = time.perf_counter() - started
  results['aims'] = aims.check_aims(results)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2, sort_keys=True)
    f.write('\n')
  markdown = report.render(results)
  with open(os.path.join(args.out, 'RESULTS.md'), 'w', encoding='utf-8') as f:
    f.write(markdown)
  print(markdown)
  print(f'benchmarks: {results["duration_s"]:.0f} s; wrote {args.out}/RESULTS.md and '
        f'{args.out}/results.json', flush=True)
  return results
