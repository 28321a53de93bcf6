"""Prediction throughput: the Beam job (in-process backend) beside the model's own limit.

Usage: python -m benchmarks.measure_predict [--count 2000] [--work /tmp/bench_predict]

Figures, all from one run on the same chips and the same (untrained: speed does not depend on the
weights) export at 128 px:
  plain_model_loop: the SavedModel on pre-decoded uint8 batches of 64 in a plain loop: the limit
                    for this model on this machine.
  decode_only:      the one decoder over the same files, one process.
  job:              python -m beam_jobs.predict, DirectRunner in-process; its steady rate is
                    (N - n) / (T(N) - T(n)) with a small run of n images, so the runner's fixed
                    start-up cost is separated from the per-image cost.
"""
import argparse
import json
import os
import shutil
import time

import numpy as np


def _timed(fn):
  start = time.perf_counter()
  value = fn()
  return time.perf_counter() - start, value


def plain_model_loop(version_dir: str, pixels: np.ndarray, batch: int = 64) -> float:
  import tensorflow as tf
  signature = tf.saved_model.load(version_dir).signatures['serving_default']
  signature(images=tf.constant(pixels[:batch]))  # trace once, like a warm server
  seconds, _ = _timed(lambda: [signature(images=tf.constant(pixels[i:i + batch]))
                               for i in range(0, len(pixels), batch)])
  return len(pixels) / seconds


def run_job(images_dir: str, export_base: str, out: str, extra=()) -> float:
  from beam_jobs import predict
  seconds, _ = _timed(lambda: predict.run(
      ['--input', images_dir, '--output_dir', out, '--model_dir', f'{export_base}/PlanetModel',
       '--overwrite', *extra]))
  return seconds


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--count', type=int, default=2000)
  parser.add_argument('--small', type=int, default=100)
  parser.add_argument('--work', default='/tmp/bench_predict')
  args = parser.parse_args(argv)
  from beam_jobs.image_decoder import decode_image
  from beam_jobs.make_sample import make_sample
  from model.export import export_model
  from model.network import build_model

  big = os.path.join(args.work, f'chips_{args.count}')
  small = os.path.join(args.work, f'chips_{args.small}')
  for folder, n in ((big, args.count), (small, args.small)):
    if not os.path.exists(os.path.join(folder, 'train_v2.csv')):
      make_sample(folder, n, seed=1)
  export_base = os.path.join(args.work, 'export')
  shutil.rmtree(export_base, ignore_errors=True)
  version_dir = export_model(build_model(128), export_base)

  files = sorted(os.listdir(os.path.join(big, 'train-jpg')))
  blobs = [open(os.path.join(big, 'train-jpg', f), 'rb').read() for f in files]
  decode_seconds, pixels = _timed(lambda: np.stack([decode_image(b, 128) for b in blobs]))
  results = {
      'count': args.count,
      'decode_only_images_per_s': len(blobs) / decode_seconds,
      'plain_model_loop_images_per_s': plain_model_loop(version_dir, pixels),
  }
  for mode, extra in (('in_process', ()),
                      ('multi_processing_2', ('--direct_running_mode=multi_processing',
                                              '--direct_num_workers=2'))):
    t_small = run_job(os.path.join(small, 'train-jpg'), export_base, f'{args.work}/out_s', extra)
    t_big = run_job(os.path.join(big, 'train-jpg'), export_base, f'{args.work}/out_b', extra)
    results[f'job_{mode}_wall_s'] = t_big
    results[f'job_{mode}_images_per_s_overall'] = args.count / t_big
    results[f'job_{mode}_images_per_s_steady'] = (args.count - args.small) / (t_big - t_small)
  results['ratio_job_steady_to_plain_loop'] = (
      max(results['job_in_process_images_per_s_steady'],
          results['job_multi_processing_2_images_per_s_steady'])
      / results['plain_model_loop_images_per_s'])
  print(json.dumps(results, indent=2))
  return results


if __name__ == '__main__':
  main()
