"""The aims each benchmark run is held to: a ratio from results.json, its target, met or not.

Usage:
  results['aims'] = check_aims(results)   # [{'id', 'aim', 'target', 'measured', 'met'}, ...]
"""
import dataclasses
from typing import Callable

__all__ = ['AIMS', 'Aim', 'check_aims']


@dataclasses.dataclass(frozen=True)
class Aim:
  """One aim: `measure` reads its figure from the results of the `sections` it needs."""
  id: str
  what: str
  target: float
  lower_is_better: bool
  sections: tuple[str, ...]
  measure: Callable[[dict], float | None]


def _ratio(section: str, name: str) -> Callable[[dict], float | None]:
  return lambda r: r[section]['ratios'][name]


def _predict_memory_growth(r: dict) -> float:
  return max(r['predict'][job]['peak_rss_growth'] for job in ('job_in_process', 'job_grpc'))


def _memory_growth_at_scale(r: dict) -> float:
  return max(r['preprocess_vs_script']['memory']['growth'],
             r['predict_vs_script']['memory']['growth'])


AIMS = (
    Aim('preprocess_speed', 'preprocess job >= 2x the one-process loop (images/s)', 2.0, False,
        ('preprocess',), _ratio('preprocess', 'job_in_process_steady_vs_baseline')),
    Aim('preprocess_bytes', 'TFRecords <= 0.3x the loop\'s bytes per image', 0.3, True,
        ('preprocess',), _ratio('preprocess', 'job_in_process_bytes_vs_baseline')),
    Aim('input_rate', 'tf.data input >= 10x the tutorial\'s Sequence (images/s, no model)', 10.0,
        False, ('training',), _ratio('training', 'tf_data_vs_sequence')),
    Aim('training_steps', 'training with the real pipeline >= 0.9x the model fed from memory',
        0.9, False, ('training',), _ratio('training', 'real_pipeline_vs_in_memory')),
    Aim('predict_speed', 'predict job >= 0.8x the model in a plain loop (images/s)', 0.8, False,
        ('predict',), _ratio('predict', 'job_in_process_steady_vs_plain_loop')),
    Aim('grpc_speed', 'gRPC predict job >= 3x the one-float32-image-per-request client', 3.0,
        False, ('predict',), _ratio('predict', 'job_grpc_steady_vs_float_client')),
    Aim('predict_memory', 'predict job\'s peak memory does not grow with the number of images',
        1.15, True, ('predict',), _predict_memory_growth),
    Aim('preprocess_vs_script', 'preprocess job, whole command at the big size, >= 0.8x the '
        'plain multiprocessing script', 0.8, False, ('preprocess_vs_script',),
        _ratio('preprocess_vs_script', 'job_overall_big_vs_script')),
    Aim('preprocess_vs_script_steady', 'preprocess job, steady rate, >= 0.8x the plain script',
        0.8, False, ('preprocess_vs_script',),
        _ratio('preprocess_vs_script', 'job_steady_vs_script')),
    Aim('predict_vs_script', 'in-process predict job, steady rate, >= 0.95x the plain threaded '
        'loop', 0.95, False, ('predict_vs_script',),
        _ratio('predict_vs_script', 'job_in_process_steady_vs_plain_loop')),
    Aim('predict_startup_vs_script', 'in-process predict job\'s start-up within 1.5 s of the '
        'plain loop\'s (seconds more)', 1.5, True, ('predict_vs_script',),
        lambda r: r['predict_vs_script'].get('startup_gap_s')),
    Aim('grpc_vs_script', 'gRPC predict job, steady rate, >= 0.8x the plain concurrent client',
        0.8, False, ('predict_vs_script',),
        _ratio('predict_vs_script', 'job_grpc_steady_vs_plain_client')),
    Aim('memory_at_scale', 'peak memory of each job at 100,000 images (the full plan) <= 1.25x '
        'its peak at 10,000 (the figures name the base each job was measured against)', 1.25,
        True, ('preprocess_vs_script', 'predict_vs_script'), _memory_growth_at_scale),
    Aim('unchanged_folder', 'an unchanged folder run again with --previous_output: cost per '
        'image >= 5x lower than a full run\'s', 5.0, False, ('predict_vs_script',),
        _ratio('predict_vs_script', 'full_vs_unchanged_cost_per_image')),
)


def check_aims(r: dict) -> list[dict]:
  """Each aim whose sections ran: the measured figure and whether it meets the target (None: no
  figure, e.g. no steady rate because the big run was not slower)."""
  checked = []
  for aim in AIMS:
    if not all(r.get(section) for section in aim.sections):
      continue
    measured = aim.measure(r)
    met = None if measured is None else bool(
        measured <= aim.target if aim.lower_is_better else measured >= aim.target)
    checked.append({'id': aim.id, 'aim': aim.what, 'target': aim.target, 'measured': measured,
                    'met': met})
  return checked
