"""results.json -> RESULTS.md: the aims' verdicts and every section's figures, as tables.

Usage:
  python -m benchmarks.report benchmarks/results.json   # renders RESULTS.md again, no measuring
"""
from benchmarks import report_vs_script
from benchmarks.aims import check_aims
from benchmarks.formatting import n as _n
from benchmarks.formatting import table as _table
from benchmarks.formatting import x as _x
from benchmarks.plan import steady_per_run

__all__ = ['headline', 'main', 'render']

def _spread(f: dict) -> tuple[float, float] | None:
  """The lowest and highest steady rate of single repeats, when there were several."""
  runs = [v for v in f.get('images_per_s_steady_runs') or [] if v is not None]
  return (min(runs), max(runs)) if len(runs) > 1 else None


def _unsteady(f: dict) -> bool:
  """A steady rate whose single repeats differ by more than 2x says little about per-image cost."""
  spread = _spread(f)
  return bool(spread and spread[1] > 2 * spread[0])


# ----------------------------------------------------------------------------- tables


def headline(r: dict) -> list[str]:
  """One line per aim: the project's figure, the one it is measured against, the ratio."""
  rows = []
  p, t, q = r.get('preprocess'), r.get('training'), r.get('predict')
  met = {a['id']: ('met' if a['met'] else 'not met' if a['met'] is False else 'n/a')
         for a in r.get('aims', [])}
  if p:
    rows.append(['preprocess, images/s (steady)',
                 f'{_n(p["job_in_process"]["images_per_s_steady"])} (job)',
                 f'{_n(p["baseline_loop"]["images_per_s_steady"])} (one-process loop)',
                 _x(p['ratios']['job_in_process_steady_vs_baseline']), '>= 2x',
                 met.get('preprocess_speed', '')])
    rows.append(['preprocess, bytes per image', _n(p['job_in_process']['bytes_per_image']),
                 _n(p['baseline_loop']['bytes_per_image']),
                 _x(p['ratios']['job_in_process_bytes_vs_baseline']), '<= 0.3x',
                 met.get('preprocess_bytes', '')])
  if t:
    rows.append(['training input, images/s (no model)',
                 f'{_n(t["tf_data_augmented"]["images_per_s"])} (tf.data, augmented)',
                 f'{_n(t["sequence_pillow_per_batch"]["images_per_s"])} (tutorial Sequence)',
                 _x(t['ratios']['tf_data_vs_sequence']), '>= 10x', met.get('input_rate', '')])
    rows.append(['training, images/s',
                 f'{_n(t["train_step_real_pipeline"]["images_per_s"])} (real pipeline)',
                 f'{_n(t["train_step_in_memory"]["images_per_s"])} (arrays in memory)',
                 _x(t['ratios']['real_pipeline_vs_in_memory']), '>= 0.9x',
                 met.get('training_steps', '')])
  if q:
    rows.append(['prediction, images/s (steady)',
                 f'{_n(q["job_in_process"]["images_per_s_steady"])} (job, in-process)',
                 f'{_n(q["plain_model_loop"]["images_per_s"])} (model in a plain loop)',
                 _x(q['ratios']['job_in_process_steady_vs_plain_loop']), '>= 0.8x',
                 met.get('predict_speed', '')])
    rows.append(['prediction via gRPC, images/s (steady)',
                 f'{_n(q["job_grpc"]["images_per_s_steady"])} (job, gRPC)',
                 f'{_n(q["float_client"]["images_per_s"])} (one float32 image per request)',
                 _x(q['ratios']['job_grpc_steady_vs_float_client']), '>= 3x',
                 met.get('grpc_speed', '')])
    if 'job_rest' in q:   # results from before the REST backend have none
      wire = q['wire_bytes_per_image']
      rows.append(['prediction via REST, images/s (steady)',
                   f'{_n(q["job_rest"]["images_per_s_steady"])} (job, REST)',
                   f'{_n(q["job_grpc"]["images_per_s_steady"])} (job, gRPC)',
                   _x(q['ratios']['job_rest_steady_vs_grpc']), '', ''])
      rows.append(['prediction requests, bytes per image', f'{_n(wire["job_rest"])} (REST, JSON)',
                   f'{_n(wire["job_grpc"])} (gRPC, uint8)', _x(q['ratios']['rest_bytes_vs_grpc']),
                   '', ''])
    rows.append([f'prediction peak RSS, MB ({r["plan"]["small"]:,} -> {r["plan"]["big"]:,} chips)',
                 f'{_n(q["job_in_process"]["peak_rss_mb_small"])} -> '
                 f'{_n(q["job_in_process"]["peak_rss_mb_big"])} (in-process)',
                 f'{_n(q["job_grpc"]["peak_rss_mb_small"])} -> '
                 f'{_n(q["job_grpc"]["peak_rss_mb_big"])} (gRPC)',
                 _x(max(q[j]['peak_rss_growth'] for j in ('job_in_process', 'job_grpc'))),
                 '<= 1.15x', met.get('predict_memory', '')])
  rows += report_vs_script.headline_rows(r, met)
  return _table(['figure', 'project', 'measured against', 'ratio', 'aim', 'verdict'], rows)


def _steady_cell(f: dict) -> str:
  spread = _spread(f)
  if not spread:
    return _n(f['images_per_s_steady'])
  if _unsteady(f):
    return f'none (single runs {_n(spread[0])}-{_n(spread[1])})'
  return f'{_n(f["images_per_s_steady"])} ({_n(spread[0])}-{_n(spread[1])})'


def _steady_ratio(f: dict, value) -> str:
  return 'n/a' if _unsteady(f) else _x(value)


def _command_row(name: str, approach: str, f: dict, extra: list[str]) -> list[str]:
  return [name, approach, _n(f['images_per_s_overall_small']), _n(f['images_per_s_overall_big']),
          _steady_cell(f), 'n/a' if _unsteady(f) else _n(f['startup_s'], 1), *extra,
          f'{_n(f["peak_rss_mb_small"])} / {_n(f["peak_rss_mb_big"])}']


def _preprocess_section(r: dict) -> list[str]:
  p, plan = r['preprocess'], r['plan']
  rows = []
  for key, name, approach in (
      ('baseline_loop', 'baseline loop', '`benchmarks/preprocess_baseline.py`: the tutorial-era '
       'one-process loop (full-size Pillow decode, resize, float32, float_list Examples, one '
       'TFRecordWriter)'),
      ('job_in_process', 'job', '`python -m beam_jobs.preprocess` (DirectRunner in this process, '
       'one encoder process per core: the default)'),
      ('job_2_workers', 'job, 2 Beam workers', 'the same, `--direct_running_mode=multi_processing '
       '--direct_num_workers=2`')):
    f = p[key]
    if key == 'baseline_loop':
      extra = [_n(f['bytes_per_image']), '1x', '1x']
    else:
      extra = [f'{_n(f["bytes_per_image"])} ({_x(p["ratios"][f"{key}_bytes_vs_baseline"])})',
               _steady_ratio(f, p['ratios'][f'{key}_steady_vs_baseline']),
               _x(p['ratios'][f'{key}_overall_vs_baseline'])]
    rows.append(_command_row(name, approach, f, extra))
  return ['## 1. Preprocess (labels CSV + JPEGs -> TFRecords, 128 px)', '',
          *_table(['contender', 'approach', f'overall, {plan["small"]:,} chips',
                   f'overall, {plan["big"]:,} chips', 'steady', 'start-up s', 'bytes per image',
                   'vs loop, steady', f'vs loop, overall at {plan["big"]:,}',
                   'peak RSS MB (small / big)'], rows), '']


def _training_section(r: dict) -> list[str]:
  t = r['training']
  sequence = t['sequence_pillow_per_batch']['images_per_s']
  rows = [
      ['tutorial Sequence', '`benchmarks/baselines.py` `KagglePlanetSequence`: Pillow `load_img` '
       'per image per batch, one worker', _n(sequence), '1x'],
      ['tf.data, augmented', '`model.dataset.make_dataset` (interleave, shuffle, batch, parse, '
       'flips/rotations, prefetch)', _n(t['tf_data_augmented']['images_per_s']),
       _x(t['ratios']['tf_data_vs_sequence'])],
      ['tf.data, no augmentation', 'the same with `augment=False`',
       _n(t['tf_data_no_augment']['images_per_s']),
       _x(t['ratios']['tf_data_no_augment_vs_sequence'])],
  ]
  memory = t['train_step_in_memory']['images_per_s']
  steps = [
      ['arrays in memory (the limit)', '`fit(x, y, batch_size=32)` on numpy arrays',
       _n(memory), _n(t['train_step_in_memory']['steps_per_s'], 2), '1x'],
      ['real pipeline', '`fit` on the augmented tf.data stream, as `model.train` does',
       _n(t['train_step_real_pipeline']['images_per_s']),
       _n(t['train_step_real_pipeline']['steps_per_s'], 2),
       _x(t['ratios']['real_pipeline_vs_in_memory'])],
  ]
  return ['## 2. Training input and training steps (128 px, batch 32)', '',
          'Input alone (no model), images/s:', '',
          *_table(['pipeline', 'approach', 'images/s', 'vs Sequence'], rows), '',
          f'Training steps of the project\'s network (`model.train`\'s compile; '
          f'{r["plan"]["train_steps"]} steps timed after {r["plan"]["train_warmup_steps"]} '
          'warm-up steps):', '',
          *_table(['fed from', 'approach', 'images/s', 'steps/s', 'vs in memory'], steps), '']


def _predict_section(r: dict) -> list[str]:
  q, plan = r['predict'], r['plan']
  loop = q['plain_model_loop']['images_per_s']
  client = q['float_client']['images_per_s']
  loops = [
      ['model in a plain loop (the limit)', f'`serving_default` on pre-decoded uint8 batches of '
       f'{q["model_batch"]}', _n(loop), '1x', _x(loop / client)],
      ['decode alone', '`decode_image` on bytes in memory', _n(q['decode_only']['images_per_s']),
       _x(q['decode_only']['images_per_s'] / loop), ''],
      ['decode then model, no overhead', 'derived: 1 / (1/decode + 1/model)',
       _n(q['serial_limit']['images_per_s']), _x(q['serial_limit']['images_per_s'] / loop), ''],
      ['tutorial client', '`benchmarks/baselines.py`: `load_img`, float32 [1,128,128,3] per '
       '`PredictRequest` to `predict_float`, one at a time', _n(client), _x(client / loop), '1x'],
      ['the server\'s limit', 'the same server fed pre-decoded uint8, 32 images per request, '
       '4 in flight (the gRPC job\'s requests)', _n(q['server_limit']['images_per_s']),
       _x(q['server_limit']['images_per_s'] / loop), _x(q['server_limit']['images_per_s'] / client)],
  ]
  if 'server_limit_rest' in q:
    rest_limit = q['server_limit_rest']['images_per_s']
    loops.append(['the server\'s limit over REST', 'the same server fed the REST job\'s JSON '
                  'bodies, encoded beforehand, 4 in flight', _n(rest_limit), _x(rest_limit / loop),
                  _x(rest_limit / client)])
  jobs = []
  for key, name, approach in (
      ('job_in_process', 'job, in-process', '`python -m beam_jobs.predict --model_dir`'),
      ('job_grpc', 'job, gRPC', '`--serving_address` to `python -m model.serve` (own process)'),
      ('job_rest', 'job, REST', '`--serving_protocol rest` to the same server\'s '
       '`--rest_api_port`')):
    if key not in q:
      continue
    f = q[key]
    steady = f['images_per_s_steady']
    jobs.append(_command_row(name, approach, f, [
        _steady_ratio(f, steady / loop) if steady else 'n/a',
        _steady_ratio(f, steady / client) if steady else 'n/a']))
  return ['## 3. Prediction (JPEG folder -> predictions, 128 px)', '',
          f'In-process loops over the first {q["decode_only"]["images"]:,} chips, images/s:', '',
          *_table(['contender', 'approach', 'images/s', 'vs plain loop', 'vs tutorial client'],
                  loops), '',
          'The job, as a command:', '',
          *_table(['contender', 'approach', f'overall, {plan["small"]:,} chips',
                   f'overall, {plan["big"]:,} chips', 'steady', 'start-up s',
                   'steady vs plain loop', 'steady vs tutorial client',
                   'peak RSS MB (small / big)'], jobs), '', *_wire_table(q)]


def _wire_table(q: dict) -> list[str]:
  """Request bytes per image on the wire, from each client's own encoder (measure_predict)."""
  wire = q.get('wire_bytes_per_image')
  if not wire:
    return []
  rows = [[name, what, _n(wire[key]), _x(wire[key] / wire['job_grpc'])] for key, name, what in (
      ('job_in_process', 'job, in-process', 'nothing: the model runs in the worker'),
      ('job_grpc', 'job, gRPC', 'raw uint8 `tensor_content`, 32 images per `PredictRequest`'),
      ('job_rest', 'job, REST', 'JSON integers, columnar `inputs`, as many images as fit 4 MiB'),
      ('float_client', 'tutorial client, gRPC', 'one float32 image per `PredictRequest`'),
      ('tutorial_rest_client', 'tutorial client, REST', 'the tutorial\'s `requests.post(..., '
       'json=...)`: float64 JSON of one float32 image'))]
  return ['Request bytes per image on the wire (answers add about 250 bytes per image):', '',
          *_table(['client', 'request', 'bytes per image', 'vs gRPC job'], rows), '']


def _decode_section(r: dict) -> list[str]:
  d = r['decode']
  rows = []
  for name, label in (('sample', 'generated chips (10% CMYK)'),
                      ('real', 'the real Planet chips (CMYK), cycled')):
    if name in d:
      rows.append([label, f'{d[name]["with_draft"]["images"]:,}',
                   _n(d[name]['with_draft']['images_per_s']),
                   _n(d[name]['without_draft']['images_per_s']), _x(d[name]['draft_speedup'])])
  return ['## 4. JPEG decode, 256 px chips -> 128 px RGB', '',
          *_table(['chips', 'decodes', 'with draft() (`decode_image`), images/s',
                   'without draft(), images/s', 'draft speed-up'], rows), '',
          'Without draft(): `Image.open` + `convert(\'RGB\')` + `resize` with the same '
          '`RESIZE_FILTER`, the whole JPEG decoded at full size first.', '']


def render(r: dict) -> str:
  plan, m, load = r['plan'], r['machine'], r['load_average']
  lines = [
      '# Benchmarks', '',
      f'`{r["command"].strip()}`, started {r["started_at"]}: **{r["duration_s"] / 60:.1f} minutes** '
      f'(plan `{plan["name"]}`: every command at {plan["small"]:,} and {plan["big"]:,} chips, '
      f'each figure the median of {plan["repeats"]} run(s), contenders interleaved; the same '
      f'generated chips, `make_sample` seed 0, 256 px JPEGs, 10% CMYK, for every stage).', '',
      f'Machine: {m.get("cpus")} CPUs ({m.get("cpu_model", "unknown")}), '
      f'{m.get("memory_gib", "?")} GiB memory, no accelerator used; Python {m["python"]}, '
      f'TensorFlow {m["tensorflow"]}, Keras {m["keras"]}, Apache Beam {m["apache_beam"]}, '
      f'Pillow {m["pillow"]}, NumPy {m["numpy"]}. Load average (1 min) during the run: '
      f'{load["min"]:.1f}-{load["max"]:.1f}, median {load["median"]:.1f} (2.0 = both cores busy; '
      'the machine is shared with other work, which slows every figure alike; ratios are taken '
      'within this run).', '',
      'Rates are images per second. For a command: **overall** = chips / wall clock of the whole '
      'command, runner start-up included; **steady** = (big - small) / (T(big) - T(small)), the '
      'per-image rate once running (in brackets: the range over single runs); **start-up** = the '
      'fixed seconds that steady rate leaves unexplained. Peak RSS: the largest total resident memory of the command\'s processes.', '',
      '## The aims', '',
      *headline(r), '']
  if 'preprocess' in r:
    lines += _preprocess_section(r)
  if 'training' in r:
    lines += _training_section(r)
  if 'predict' in r:
    lines += _predict_section(r)
  if 'decode' in r:
    lines += _decode_section(r)
  lines += report_vs_script.section(r)
  lines += [
      '## How it was measured', '',
      f'- The same chips everywhere: `make_sample` seed 0; the {plan["small"]:,}-chip set is the '
      f'first {plan["small"]:,} of the {plan["big"]:,}. One export of the project\'s network '
      '(`build_model(128)`, untrained: speed does not depend on the weights).',
      '- Commands (both jobs and the preprocess loop) run as their users run them, as a process '
      'of their own, timed from start to exit; their memory is the total RSS of the process and '
      'its descendants, sampled from /proc every 0.2 s.',
      f'- The loops (decode, model, the tutorial\'s client, the server\'s limit) run inside the '
      f'benchmark process over the first {plan["loop_images"]:,} chips, with no start-up to pay: '
      'compare them with the commands\' steady rates.',
      '- gRPC and REST: the jobs and the tutorial\'s client talk to the same server, the '
      'project\'s `python -m model.serve --rest_api_port` (TF Serving\'s two APIs in Python, no '
      'server-side batching; JSON read with orjson where TF Serving uses C++ rapidjson) in a '
      'process of its own, started once; `tensorflow_model_server` is not installed here.',
      '- Training steps: two copies of the network with the same seed and compile, one per feed; '
      'a callback times each step, and the warm-up steps (tracing, the shuffle buffer) are left '
      'out.',
      '- In each repeat every contender runs once, in turn, so a change in the machine\'s load '
      'reaches all of them. RESULTS.md is rendered from results.json: `python -m '
      'benchmarks.report benchmarks/results.json` renders it again without measuring.', '']
  order = ['data_and_export', *r.get('sections_run', [])]
  seconds = ', '.join(f'{k.replace("_", " ")} {r["section_seconds"][k]:.0f} s' for k in order
                      if k in r['section_seconds'])
  lines += [f'Time per section: {seconds}.', '']
  return '\n'.join(lines)


def main(argv=None):
  """Re-renders RESULTS.md from a results.json (no measuring): python -m benchmarks.report FILE."""
  import argparse  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('results_json')
  args = parser.parse_args(argv)
  with open(args.results_json, encoding='utf-8') as f:
    results = json.load(f)
  for section in ('preprocess', 'predict', 'preprocess_vs_script', 'predict_vs_script'):
    for figures in results.get(section, {}).values():
      if isinstance(figures, dict) and 'seconds_small' in figures:
        figures['images_per_s_steady_runs'] = steady_per_run(
            results['plan'], figures['seconds_small'], figures['seconds_big'])
  results['aims'] = check_aims(results)
  with open(args.results_json, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2, sort_keys=True)
    f.write('\n')
  with open(os.path.join(os.path.dirname(args.results_json), 'RESULTS.md'), 'w',
            encoding='utf-8') as f:
    f.write(render(results))


if __name__ == '__main__':
  main()
