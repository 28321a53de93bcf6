"""RESULTS.md's tables of the runs against the plain scripts a user would write instead, and of
the unchanged folder run again: their rows of the aims table and their own section.

Usage:
  rows += headline_rows(results, verdicts)   # report.headline's rows
  lines += section(results)                  # '## 5. Against the scripts ...'
"""
from benchmarks.formatting import n as _n
from benchmarks.formatting import table
from benchmarks.formatting import x as _x

__all__ = ['headline_rows', 'section']


def _cpu(f: dict) -> str:
  return _n(f.get('cpu_ms_per_image_steady'), 2)


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
