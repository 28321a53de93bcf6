"""The opponent for in-process prediction: the short script a competent engineer writes instead.

No Beam and none of this project's code: `tf.saved_model.load`, a thread pool decoding ahead with
Pillow (which releases the GIL), batches of uint8 images to `serving_default`, one JSON line per
image. The benchmark runs it beside `python -m beam_jobs.predict` on the same chips and export.

Usage:
  python -m benchmarks.plain_predict --images_dir DIR --model_dir VERSION_DIR --output FILE \
      [--batch_size 64] [--threads N]
Prints one JSON line at the end: {"images": n, "seconds": s, "startup_seconds": s}: `seconds` is
the whole command, from the process's start to the last line written; `startup_seconds` is the
part until the model is loaded (interpreter, imports, load).
"""
import argparse
import collections
import concurrent.futures
import itertools
import json
import os
import time

import numpy as np
from PIL import Image

__all__ = ['main']


def _decode(path: str, size: int) -> np.ndarray:
  with Image.open(path) as image:
    image.draft('RGB', (size, size))
    image = image.convert('RGB')
    if image.size != (size, size):
      image = image.resize((size, size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images_dir', required=True)
  parser.add_argument('--model_dir', required=True, help='a SavedModel version folder')
  parser.add_argument('--output', required=True)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  args = parser.parse_args(argv)

  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  model = tf.saved_model.load(args.model_dir)
  serve = model.signatures['serving_default']
  size = serve.structured_input_signature[1]['images'].shape[1]
  # The process's own start counts too: a user waits for the interpreter and the imports.
  startup = time.time() - _process_start()

  paths = sorted(os.path.join(args.images_dir, name) for name in os.listdir(args.images_dir)
                 if name.lower().endswith(('.jpg', '.jpeg', '.png', '.tif', '.tiff')))
  count = 0
  with concurrent.futures.ThreadPoolExecutor(args.threads) as pool, \
       open(args.output, 'w', encoding='utf-8') as out:
    # Decodes a few batches ahead while the model runs; bounded, so memory stays flat.
    ahead = collections.deque()
    queued = iter(paths)
    for path in itertools.islice(queued, args.batch_size * 4):
      ahead.append((path, pool.submit(_decode, path, size)))
    while ahead:
      batch = [ahead.popleft() for _ in range(min(args.batch_size, len(ahead)))]
      for path in itertools.islice(queued, len(batch)):
        ahead.append((path, pool.submit(_decode, path, size)))
      outputs = serve(images=tf.constant(np.stack([future.result() for _, future in batch])))
      weather, ground = outputs['weather'].numpy(), outputs['ground'].numpy()
      for i, (path, _) in enumerate(batch):
        out.write(json.dumps({'image_name': os.path.splitext(os.path.basename(path))[0],
                              'weather': weather[i].tolist(), 'ground': ground[i].tolist()}) + '\n')
      count += len(batch)
  print(json.dumps({'images': count, 'seconds': round(time.time() - _process_start(), 3),
                    'startup_seconds': round(startup, 3)}), flush=True)


def _process_start() -> float:
  """When this process started (wall clock), from /proc (to 10 ms); now where there is no /proc."""
  try:
    with open('/proc/self/stat', encoding='ascii') as f:
      started_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime', encoding='ascii') as f:
      uptime = float(f.read().split()[0])
    return time.time() - (uptime - started_ticks / os.sysconf('SC_CLK_TCK'))
  except (OSError, ValueError, IndexError):
    return time.time()

if __name__ == '__main__':
  main()
