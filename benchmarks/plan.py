"""What one benchmark run measures (sizes, repeats, steps) and how its raw timings become figures.

Every figure is the median of `repeats` runs; the raw samples are kept beside it. A command (a
job, or a baseline run as its user runs it) is timed whole at two sizes, so its fixed start-up
cost and its per-image cost separate:

  overall = N / T(N)                      (everything the user waits for)
  steady  = (N_big - N_small) / (T(N_big) - T(N_small))   (the per-image cost alone)

with T the median wall clock at each size.
"""
import dataclasses
import statistics


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes and repeat counts. `full`, `quick` and `tiny` are the three presets."""
  name: str
  small: int                 # chips in the small run of every command
  big: int                   # chips in the big run
  repeats: int               # runs per figure (the median is reported)
  loop_images: int           # chips through the in-process loops (decode, model, client)
  train_warmup_steps: int    # training steps before the clock starts (tracing, buffers)
  train_steps: int           # training steps timed
  input_batches: int         # tf.data batches timed per run of the input-rate figure
  # Against the plain scripts: preprocess is timed at two larger sizes, since the plain Pool
  # script is fast enough that `small` chips would be mostly start-up; memory at a third.
  script_small: int = 20000  # chips in the small preprocess run against the plain script
  script_big: int = 50000    # chips in the big one
  memory_big: int = 100000   # one run of each job here; its peak RSS against the 10,000-chip one
  commands_in_process: bool = False  # call each command's main() here (tiny: tests the harness)

  def describe(self) -> dict:
    return dataclasses.asdict(self)


PLANS = {
    'full': Plan('full', small=2000, big=10000, repeats=3, loop_images=3000,
                 train_warmup_steps=10, train_steps=60, input_batches=200),
    'quick': Plan('quick', small=300, big=1500, repeats=1, loop_images=600,
                  train_warmup_steps=5, train_steps=20, input_batches=60,
                  script_small=1500, script_big=6000, memory_big=6000),
    'tiny': Plan('tiny', small=8, big=24, repeats=1, loop_images=24,
                 train_warmup_steps=1, train_steps=2, input_batches=2,
                 script_small=8, script_big=24, memory_big=32, commands_in_process=True),
}


def median(values) -> float:
  return float(statistics.median(values))


def rate(images: int, seconds: float) -> float:
  return images / seconds if seconds > 0 else float('inf')


def steady_per_run(plan_dict: dict, seconds_small: list[float], seconds_big: list[float]) -> list:
  """The steady rate of each repeat alone (small and big runs paired in order): its spread shows
  how far the median steady rate can be trusted. None where the big run was not slower."""
  return [(plan_dict['big'] - plan_dict['small']) / (big - small) if big > small else None
          for small, big in zip(seconds_small, seconds_big)]


def two_size_figures(plan: Plan, small_runs: list, big_runs: list) -> dict:
  """Figures of a command timed `repeats` times at each size (CommandRun lists)."""
  t_small = median(r.seconds for r in small_runs)
  t_big = median(r.seconds for r in big_runs)
  steady = ((plan.big - plan.small) / (t_big - t_small)) if t_big > t_small else None
  return {
      'seconds_small': [round(r.seconds, 2) for r in small_runs],
      'seconds_big': [round(r.seconds, 2) for r in big_runs],
      'images_per_s_overall_small': rate(plan.small, t_small),
      'images_per_s_overall_big': rate(plan.big, t_big),
      'images_per_s_steady': steady,
      'images_per_s_steady_runs': steady_per_run(plan.describe(), [r.seconds for r in small_runs],
                                                 [r.seconds for r in big_runs]),
      'startup_s': (t_small - plan.small / steady) if steady else None,
      'cpu_seconds_small': [round(r.cpu_seconds, 2) for r in small_runs],
      'cpu_seconds_big': [round(r.cpu_seconds, 2) for r in big_runs],
      # CPU per image once running: what the command costs the machine, whatever the load.
      'cpu_ms_per_image_steady': 1000 * (median(r.cpu_seconds for r in big_runs)
                                         - median(r.cpu_seconds for r in small_runs))
                                 / (plan.big - plan.small),
      'peak_rss_mb_small': max(r.peak_rss_mb for r in small_runs),
      'peak_rss_mb_big': max(r.peak_rss_mb for r in big_runs),
      'max_process_rss_mb_small': max(r.max_process_rss_mb for r in small_runs),
      'max_process_rss_mb_big': max(r.max_process_rss_mb for r in big_runs),
  }


def loop_figures(images: int, seconds: list[float]) -> dict:
  """Figures of an in-process loop timed `repeats` times over `images` items."""
  return {'images': images, 'seconds': [round(s, 3) for s in seconds],
          'images_per_s': rate(images, median(seconds))}


def ratio(numerator, denominator):
  if numerator is None or denominator in (None, 0):
    return None
  return numerator / denominator
