"""Preprocess throughput and output size: the Beam job on N workers beside the one-process loop.

Usage: python -m benchmarks.measure_preprocess [--count 5000] [--small 500] [--workers 2]
                                               [--work /tmp/bench_preprocess]

Figures, all on the same generated chips (make_sample, seed 0) at 128 px:
  baseline: benchmarks/preprocess_baseline.py, one process: full-size Pillow decode, resize,
            float32, float_list Examples through one tf.io.TFRecordWriter.
  job:      python -m beam_jobs.preprocess with --direct_running_mode=multi_processing
            --direct_num_workers=W, timed from the outside (process start to exit). Its steady
            rate is (N - n) / (T(N) - T(n)) with a small run of n chips, which separates the
            runner's fixed start-up (worker processes, imports) from the per-image cost.
  job_in_process: the same with the default in-process DirectRunner (one process, for
            comparison: on a small machine the worker processes' data plane costs more than
            the second core gives).
  bytes:    the job's TFRecord shards against the baseline's file.
Writes WORK/preprocess_benchmark.json and prints a table.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from benchmarks.preprocess_baseline import convert


def _sample(work: str, count: int) -> str:
  """WORK/sample_<count>/ with chips and CSV, made once and reused."""
  root = os.path.join(work, f'sample_{count}')
  if not os.path.exists(os.path.join(root, 'train_v2.csv')):
    from beam_jobs.make_sample import make_sample
    shutil.rmtree(root, ignore_errors=True)
    make_sample(root, count, seed=0)
  return root


def _run_job(sample: str, out: str, workers: int) -> float:
  """Seconds for the whole command; workers=0 runs in-process."""
  command = [sys.executable, '-m', 'beam_jobs.preprocess',
             '--labels_csv', os.path.join(sample, 'train_v2.csv'),
             '--images_dir', os.path.join(sample, 'train-jpg'), '--output_dir', out, '--overwrite']
  if workers:
    command += ['--direct_running_mode=multi_processing', f'--direct_num_workers={workers}']
  started = time.perf_counter()
  subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  return time.perf_counter() - started


def _shard_bytes(out: str) -> int:
  with open(os.path.join(out, 'manifest.json'), encoding='utf-8') as f:
    manifest = json.load(f)
  return sum(os.path.getsize(os.path.join(out, p))
             for paths in manifest['shards'].values() for p in paths)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--count', type=int, default=5000)
  parser.add_argument('--small', type=int, default=500, help='chips in the start-up run')
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--work', default='/tmp/bench_preprocess')
  args = parser.parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

  big, small = _sample(args.work, args.count), _sample(args.work, args.small)
  baseline = convert(os.path.join(big, 'train_v2.csv'), os.path.join(big, 'train-jpg'),
                     os.path.join(args.work, 'baseline.tfrecord'))
  t_small = _run_job(small, os.path.join(args.work, 'out_small'), args.workers)
  t_big = _run_job(big, os.path.join(args.work, 'out_big'), args.workers)
  job_bytes = _shard_bytes(os.path.join(args.work, 'out_big'))
  steady = (args.count - args.small) / (t_big - t_small)
  t_small_1 = _run_job(small, os.path.join(args.work, 'out_small_1'), 0)
  t_big_1 = _run_job(big, os.path.join(args.work, 'out_big_1'), 0)
  steady_1 = (args.count - args.small) / (t_big_1 - t_small_1)
  result = {
      'count': args.count, 'workers': args.workers, 'cpus': os.cpu_count(),
      'load_average_1min': os.getloadavg()[0],
      'baseline_images_per_second': round(baseline['images_per_second'], 1),
      'baseline_bytes_per_image': baseline['bytes'] // args.count,
      'job_seconds': round(t_big, 1), 'job_small_seconds': round(t_small, 1),
      'job_images_per_second_end_to_end': round(args.count / t_big, 1),
      'job_images_per_second_steady': round(steady, 1),
      'job_bytes_per_image': job_bytes // args.count,
      'speedup_steady': round(steady / baseline['images_per_second'], 2),
      'speedup_end_to_end': round(args.count / t_big / baseline['images_per_second'], 2),
      'bytes_ratio': round(job_bytes / baseline['bytes'], 3),
      'job_in_process_seconds': round(t_big_1, 1),
      'job_in_process_images_per_second_steady': round(steady_1, 1),
      'job_in_process_images_per_second_end_to_end': round(args.count / t_big_1, 1),
  }
  with open(os.path.join(args.work, 'preprocess_benchmark.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
  print(f'{args.count} chips, {args.workers} workers, {result["cpus"]} CPUs, '
        f'load {result["load_average_1min"]:.1f}')
  print(f'  baseline loop: {result["baseline_images_per_second"]:>7.1f} images/s, '
        f'{result["baseline_bytes_per_image"]} bytes/image')
  print(f'  job (steady):  {result["job_images_per_second_steady"]:>7.1f} images/s '
        f'({result["speedup_steady"]}x), {result["job_bytes_per_image"]} bytes/image '
        f'({result["bytes_ratio"]}x)')
  print(f'  job (end to end, incl. {result["job_small_seconds"]} s for {args.small} chips of '
        f'start-up): {result["job_images_per_second_end_to_end"]:.1f} images/s '
        f'({result["speedup_end_to_end"]}x), {result["job_seconds"]} s')
  print(f'  job in-process, 1 worker: {steady_1:.1f} images/s steady, '
        f'{result["job_in_process_images_per_second_end_to_end"]} end to end, {t_big_1:.1f} s')


if __name__ == '__main__':
  main()
