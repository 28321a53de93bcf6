"""The aims and tables of the runs against the plain scripts (issue 14) and the incremental run
(issue 16): results.json -> plain words and markdown, from the figures of the same run.

report.py reads AIMS, WHY, `headline_rows` and `section`; the ratios are taken within one run,
the contenders interleaved.
"""
from benchmarks.formatting import n as _n
from benchmarks.formatting import table
from benchmarks.formatting import x as _x

# id, what, target, lower is better
AIMS = (
    ('preprocess_vs_script', 'preprocess job, whole command at the big size, >= 0.8x the plain '
     'multiprocessing script', 0.8, False),
    ('preprocess_vs_script_steady', 'preprocess job, steady rate, >= 0.8x the plain script', 0.8,
     False),
    ('predict_vs_script', 'in-process predict job, steady rate, >= 0.95x the plain threaded loop',
     0.95, False),
    ('predict_startup_vs_script', 'in-process predict job\'s start-up within 1.5 s of the plain '
     'loop\'s (seconds more)', 1.5, True),
    ('grpc_vs_script', 'gRPC predict job, steady rate, >= 0.8x the plain concurrent client', 0.8,
     False),
    ('memory_at_scale', 'peak memory of each job at 100,000 images (the full plan) <= 1.25x its '
     'peak at 10,000 (issue 14; the figures name the base each job was measured against)', 1.25,
     True),
    ('unchanged_folder', 'an unchanged folder run again with --previous_output: cost per image '
     '>= 5x lower than a full run\'s', 5.0, False),
)


def _cpu(f: dict) -> str:
  return _n(f.get('cpu_ms_per_image_steady'), 2)


def _why_preprocess(r, steady_only: bool):
  p = r.get('preprocess_vs_script')
  if not p:
    return None
  job, script, sizes = p['job'], p['plain_script'], p['sizes']
  if steady_only:
    ratio = p['ratios']['job_steady_vs_script']
    text = (f'Steady ({sizes["small"]:,} -> {sizes["big"]:,} chips): {_n(job["images_per_s_steady"])} '
            f'images/s for the job against {_n(script["images_per_s_steady"])} for the script '
            f'({_x(ratio)}). CPU per image once running: {_cpu(job)} ms for the job, '
            f'{_cpu(script)} ms for the script.')
    if ratio is not None and ratio < 0.8:
      text += (' Both keep the two cores busy, so the CPU per image is the gap: the job\'s own '
               'work per image (the join with the CSV, the outcomes its encoder processes send '
               'back, the dead-letter and count branches) beside the decode both do.')
    return ratio, text
  ratio = p['ratios']['job_overall_big_vs_script']
  text = (f'At {sizes["big"]:,} chips the job takes '
          f'{_n(sizes["big"] / job["images_per_s_overall_big"], 1)} s as a whole command, the '
          f'plain script {_n(sizes["big"] / script["images_per_s_overall_big"], 1)} s '
          f'({_x(ratio)}); at {sizes["small"]:,} chips '
          f'{_x(p["ratios"]["job_overall_small_vs_script"])}. Start-up (the seconds the steady '
          f'rate leaves unexplained): {_n(job["startup_s"], 1)} s for the job, '
          f'{_n(script["startup_s"], 1)} s for the script.')
  if job['examples_written_big'] != script['examples_written_big']:
    text += (f' They did not write the same number of Examples ({job["examples_written_big"]:,} '
             f'against {script["examples_written_big"]:,}).')
  return ratio, text


def _why_predict(r):
  q = r.get('predict_vs_script')
  if not q:
    return None
  job, loop = q['job_in_process'], q['plain_loop']
  ratio = q['ratios']['job_in_process_steady_vs_plain_loop']
  text = (f'Steady ({r["plan"]["small"]:,} -> {r["plan"]["big"]:,} chips): the job predicts '
          f'{_n(job["images_per_s_steady"])} images/s, the plain loop {_n(loop["images_per_s_steady"])} '
          f'({_x(ratio)}); whole command at {r["plan"]["big"]:,} chips '
          f'{_x(q["ratios"]["job_in_process_overall_big_vs_plain_loop"])}. CPU per image once '
          f'running: {_cpu(job)} ms for the job, {_cpu(loop)} ms for the loop.')
  if ratio is not None and ratio < 0.95:
    text += (' The model and the decode are the same in both; on two cores the job\'s extra CPU '
             'per image (Beam\'s per-element steps and the outputs the loop does not write: '
             'submission, summary, report, dead letters) is taken from the model\'s cores.')
  return ratio, text


def _why_startup(r):
  q = r.get('predict_vs_script')
  if not q:
    return None
  gap = q.get('startup_gap_s')
  if gap is None:
    return None, ('No start-up could be separated: a steady rate needs the big run to be slower '
                  'than the small one, for the job and for the plain loop.')
  return gap, (f'Start-up (the seconds the steady rate leaves unexplained): '
               f'{_n(q["job_in_process"]["startup_s"], 1)} s for the job, '
               f'{_n(q["plain_loop"]["startup_s"], 1)} s for the plain loop: {gap:+.1f} s.')


def _why_grpc(r):
  q = r.get('predict_vs_script')
  if not q:
    return None
  job, client = q['job_grpc'], q['plain_grpc_client']
  ratio = q['ratios']['job_grpc_steady_vs_plain_client']
  text = (f'Against the same server (`python -m model.serve`, its own process): the job '
          f'{_n(job["images_per_s_steady"])} images/s steady, the plain concurrent client '
          f'{_n(client["images_per_s_steady"])} ({_x(ratio)}); whole command at '
          f'{r["plan"]["big"]:,} chips {_x(q["ratios"]["job_grpc_overall_big_vs_plain_client"])}. '
          f'Client-side CPU per image once running: {_cpu(job)} ms for the job, {_cpu(client)} ms '
          'for the script; the server (the model) shares the same two cores with the client.')
  return ratio, text


def _why_memory(r):
  p, q = r.get('preprocess_vs_script'), r.get('predict_vs_script')
  if not p or not q:
    return None
  growth = max(p['memory']['growth'], q['memory']['growth'])
  text = '; '.join(
      f'{name}: {_n(m["peak_rss_mb"])} MB at {m["chips"]:,} images against {_n(base)} MB at '
      f'{m["against_chips"]:,} ({_x(m["growth"])})'
      for name, m, base in (('preprocess', p['memory'], p['memory']['against_peak_rss_mb']),
                            ('predict, in-process', q['memory'],
                             q['job_in_process']['peak_rss_mb_big'])))
  return growth, text + ' (peak total RSS of the job\'s processes; one run at the large size).'


def _why_unchanged(r):
  q = r.get('predict_vs_script')
  if not q:
    return None
  full, again = q['job_in_process'], q['job_unchanged']
  ratio = q['ratios']['full_vs_unchanged_cost_per_image']
  carried = (again['said_big'].get('incremental') or {})
  text = (f'Per image once running ({r["plan"]["small"]:,} -> {r["plan"]["big"]:,} chips): a full '
          f'run costs {_n(1000 / full["images_per_s_steady"], 2) if full["images_per_s_steady"] else "n/a"} ms '
          f'of wall clock, the same folder run again with `--previous_output` '
          f'{_n(1000 / again["images_per_s_steady"], 2) if again["images_per_s_steady"] else "n/a"} ms '
          f'({_x(ratio)}); CPU {_cpu(full)} against {_cpu(again)} ms. The unchanged run at '
          f'{r["plan"]["big"]:,} chips wrote {again["said_big"]["rows"]:,} rows and inferred '
          f'{again["said_big"]["inferred"]:,} images ({json_counts(carried)}).')
  return ratio, text


def json_counts(incremental: dict) -> str:
  pairs = [(k, v) for k, v in incremental.items() if isinstance(v, int)]
  return ', '.join(f'{k} {v:,}' for k, v in sorted(pairs)) or 'no incremental counts'


WHY = {
    'preprocess_vs_script': lambda r: _why_preprocess(r, steady_only=False),
    'preprocess_vs_script_steady': lambda r: _why_preprocess(r, steady_only=True),
    'predict_vs_script': _why_predict,
    'predict_startup_vs_script': _why_startup,
    'grpc_vs_script': _why_grpc,
    'memory_at_scale': _why_memory,
    'unchanged_folder': _why_unchanged,
}


def headline_rows(r: dict, met: dict) -> list[list[str]]:
  """Rows of the aims table (figure, project, against, ratio, aim, verdict)."""
  rows = []
  p, q = r.get('preprocess_vs_script'), r.get('predict_vs_script')
  if p:
    big = p['sizes']['big']
    rows.append([f'preprocess, whole command at {big:,} chips, images/s',
                 f'{_n(p["job"]["images_per_s_overall_big"])} (job)',
                 f'{_n(p["plain_script"]["images_per_s_overall_big"])} (plain Pool script)',
                 _x(p['ratios']['job_overall_big_vs_script']), '>= 0.8x',
                 met.get('preprocess_vs_script', '')])
    rows.append(['preprocess, steady, images/s', _n(p['job']['images_per_s_steady']),
                 _n(p['plain_script']['images_per_s_steady']),
                 _x(p['ratios']['job_steady_vs_script']), '>= 0.8x',
                 met.get('preprocess_vs_script_steady', '')])
  if q:
    rows.append(['predict in-process, steady, images/s',
                 _n(q['job_in_process']['images_per_s_steady']),
                 f'{_n(q["plain_loop"]["images_per_s_steady"])} (plain threaded loop)',
                 _x(q['ratios']['job_in_process_steady_vs_plain_loop']), '>= 0.95x',
                 met.get('predict_vs_script', '')])
    rows.append(['predict in-process, start-up s', _n(q['job_in_process']['startup_s'], 1),
                 _n(q['plain_loop']['startup_s'], 1),
                 'n/a' if q['startup_gap_s'] is None else f'{q["startup_gap_s"]:+.1f} s',
                 '<= +1.5 s', met.get('predict_startup_vs_script', '')])
    rows.append(['predict through gRPC, steady, images/s', _n(q['job_grpc']['images_per_s_steady']),
                 f'{_n(q["plain_grpc_client"]["images_per_s_steady"])} (plain concurrent client)',
                 _x(q['ratios']['job_grpc_steady_vs_plain_client']), '>= 0.8x',
                 met.get('grpc_vs_script', '')])
    rows.append(['unchanged folder again, cost per image',
                 _n(q['job_unchanged']['images_per_s_steady']) + ' images/s (--previous_output)',
                 _n(q['job_in_process']['images_per_s_steady']) + ' images/s (full run)',
                 _x(q['ratios']['full_vs_unchanged_cost_per_image']), '>= 5x',
                 met.get('unchanged_folder', '')])
  if p and q:
    rows.append([f'peak RSS at {p["memory"]["chips"]:,} images vs '
                 f'{p["memory"]["against_chips"]:,} / {q["memory"]["against_chips"]:,}',
                 f'{_x(p["memory"]["growth"])} (preprocess)', f'{_x(q["memory"]["growth"])} (predict)',
                 _x(max(p['memory']['growth'], q['memory']['growth'])), '<= 1.25x',
                 met.get('memory_at_scale', '')])
  return rows


def _row(name: str, approach: str, f: dict, small: int, big: int) -> list[str]:
  return [name, approach, _n(small / f['images_per_s_overall_small'] if f['images_per_s_overall_small'] else None, 1),
          _n(big / f['images_per_s_overall_big'] if f['images_per_s_overall_big'] else None, 1),
          _n(f['images_per_s_steady']), _n(f['startup_s'], 1), _cpu(f),
          f'{_n(f["peak_rss_mb_small"])} / {_n(f["peak_rss_mb_big"])}']


def section(r: dict) -> list[str]:
  """'## 5. Against the scripts a user would write instead': the two tables."""
  p, q, plan = r.get('preprocess_vs_script'), r.get('predict_vs_script'), r['plan']
  if not p and not q:
    return []
  lines = ['## 5. Against the scripts a user would write instead', '',
           'Each a whole command in its own process, contenders interleaved in every repeat. '
           'Seconds are medians; steady and start-up as above; CPU ms per image = (CPU seconds of '
           'the big run - of the small run) / (big - small), the command and the children it '
           'waited for.', '']
  header = ['contender', 'approach', 'seconds, small', 'seconds, big', 'steady images/s',
            'start-up s', 'CPU ms / image', 'peak RSS MB (small / big)']
  if p:
    small, big = p['sizes']['small'], p['sizes']['big']
    lines += [f'Preprocess, {small:,} and {big:,} chips:', '', *table(header, [
        _row('plain script', '`benchmarks/plain_preprocess.py`: `multiprocessing.Pool` over every '
             'core, Pillow draft + RGB + box resize, uint8 Examples, one TFRecord per worker',
             p['plain_script'], small, big),
        _row('job', '`python -m beam_jobs.preprocess` (DirectRunner in this process, one '
             'encoder process per core: the default)', p['job'], small, big)]), '',
              f'The job at {p["memory"]["chips"]:,} chips: {_n(p["memory"]["seconds"], 1)} s, '
              f'peak RSS {_n(p["memory"]["peak_rss_mb"])} MB.', '']
  if q:
    rows = [_row(name, approach, q[key], plan['small'], plan['big']) for key, name, approach in (
        ('plain_loop', 'plain loop', '`benchmarks/plain_predict.py`: SavedModel in the script, '
         'thread pool decoding ahead with Pillow, batches of 64'),
        ('job_in_process', 'job, in-process', '`python -m beam_jobs.predict --model_dir`'),
        ('job_unchanged', 'job, unchanged folder', 'the same with `--previous_output` of the '
         'full run of the same folder'),
        ('plain_grpc_client', 'plain gRPC client', '`benchmarks/plain_grpc_client.py`: decode '
         'ahead, 32 uint8 images per request, 4 in flight'),
        ('job_grpc', 'job, gRPC', '`--serving_address`, the same server'))]
    lines += [f'Prediction, {plan["small"]:,} and {plan["big"]:,} chips (server: '
              f'{_n(q["server_rss_mb"])} MB RSS):', '', *table(header, rows), '',
              f'The in-process job at {q["memory"]["chips"]:,} chips: '
              f'{_n(q["memory"]["seconds"], 1)} s, peak RSS {_n(q["memory"]["peak_rss_mb"])} MB.',
              '']
  return lines
