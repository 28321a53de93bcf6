"""The benchmark's inputs, made once and reused: generated chip sets, an export, a prepared set.

Chip i of `make_sample(seed)` is the same whatever the count, so only the largest set is drawn;
a smaller set is the first n chips of it, hard-linked, with the first n CSV rows. Drawing a chip
costs far more than linking one, so no more than `MAX_DRAWN` chips are drawn: a larger set
repeats the drawn ones under new names (chip j is drawn chip j mod MAX_DRAWN, hard-linked as
`train_<j>` with that chip's tags): the same decode and model work per chip, with the first
MAX_DRAWN chips identical to the drawn set. A folder is complete once its `done.json` exists
(written last), so an interrupted generation is redone.

Usage: python -m benchmarks.workspace --work /tmp/planet_bench --count 10000   # make it ahead
"""
import argparse
import json
import os
import shutil
import time

SEED = 0
IMAGE_SIZE = 128
MAX_DRAWN = 10000
_DONE = 'done.json'


def _is_done(folder: str) -> bool:
  return os.path.exists(os.path.join(folder, _DONE))


def _mark_done(folder: str, facts: dict) -> None:
  with open(os.path.join(folder, _DONE), 'w', encoding='utf-8') as f:
    json.dump(facts, f)


def chips(work: str, count: int, draw_at_least: int = 0) -> str:
  """WORK/data/chips_<count>/ (train-jpg/ and train_v2.csv), drawn or linked when missing.

  `draw_at_least` draws a larger set first when one is needed anyway, so the smaller is linked
  from it rather than drawn twice.
  """
  folder = os.path.join(work, 'data', f'chips_{count}')
  if _is_done(folder):
    return folder
  larger = _largest_done(work, count)
  if larger is None and count > MAX_DRAWN:
    return _repeated(work, folder, count, chips(work, MAX_DRAWN))
  if larger is None and draw_at_least > count:
    larger = chips(work, min(draw_at_least, MAX_DRAWN))   # drawn: never above MAX_DRAWN
  shutil.rmtree(folder, ignore_errors=True)
  if larger is None:
    from beam_jobs.make_sample import make_sample  # pylint: disable=import-outside-toplevel
    started = time.perf_counter()
    print(f'benchmarks: drawing {count} sample chips into {folder} (once; ~100 chips/s)', flush=True)
    make_sample(folder, count, seed=SEED)
    _mark_done(folder, {'count': count, 'seed': SEED, 'seconds': time.perf_counter() - started})
    return folder
  os.makedirs(os.path.join(folder, 'train-jpg'))
  with open(os.path.join(larger, 'train_v2.csv'), encoding='utf-8') as f:
    lines = f.read().splitlines()
  rows = lines[1:count + 1]
  for row in rows:
    name = row.split(',', 1)[0] + '.jpg'
    os.link(os.path.join(larger, 'train-jpg', name), os.path.join(folder, 'train-jpg', name))
  with open(os.path.join(folder, 'train_v2.csv'), 'w', encoding='utf-8') as f:
    f.write('\n'.join([lines[0], *rows]) + '\n')
  _mark_done(folder, {'count': count, 'seed': SEED, 'linked_from': larger})
  return folder


def _repeated(work: str, folder: str, count: int, drawn: str) -> str:
  """WORK/data/chips_<count>: the drawn chips repeated under new names (see the module doc)."""
  del work
  shutil.rmtree(folder, ignore_errors=True)
  os.makedirs(os.path.join(folder, 'train-jpg'))
  with open(os.path.join(drawn, 'train_v2.csv'), encoding='utf-8') as f:
    lines = f.read().splitlines()
  header, rows = lines[0], [line.split(',', 1) for line in lines[1:] if line]
  out_rows = []
  for j in range(count):
    name, tags = rows[j % len(rows)]
    new_name = name if j < len(rows) else f'train_{j}'
    os.link(os.path.join(drawn, 'train-jpg', name + '.jpg'),
            os.path.join(folder, 'train-jpg', new_name + '.jpg'))
    out_rows.append(f'{new_name},{tags}')
  with open(os.path.join(folder, 'train_v2.csv'), 'w', encoding='utf-8') as f:
    f.write('\n'.join([header, *out_rows]) + '\n')
  _mark_done(folder, {'count': count, 'seed': SEED, 'repeated_from': drawn})
  return folder


def _largest_done(work: str, at_least: int) -> str | None:
  data = os.path.join(work, 'data')
  if not os.path.isdir(data):
    return None
  counts = sorted((int(name.split('_')[1]) for name in os.listdir(data)
                   if name.startswith('chips_') and name.split('_')[1].isdigit()), reverse=True)
  for count in counts:
    folder = os.path.join(data, f'chips_{count}')
    done = _is_done(folder) and _read_done(folder)
    if count > at_least and done and not {'linked_from', 'repeated_from'} & set(done):
      return folder
  return None


def _read_done(folder: str) -> dict:
  with open(os.path.join(folder, _DONE), encoding='utf-8') as f:
    return json.load(f)


def image_paths(folder: str) -> list[str]:
  """The chips of a set in CSV order."""
  with open(os.path.join(folder, 'train_v2.csv'), encoding='utf-8') as f:
    names = [line.split(',', 1)[0] for line in f.read().splitlines()[1:] if line]
  return [os.path.join(folder, 'train-jpg', name + '.jpg') for name in names]


def export(work: str, image_size: int = IMAGE_SIZE) -> str:
  """WORK/export_<size>/PlanetModel/1: the project's network with untrained weights.

  Speed does not depend on the weights, so the benchmark needs no training run.
  """
  base = os.path.join(work, f'export_{image_size}')
  version_dir = os.path.join(base, 'PlanetModel', '1')
  if _is_done(base):
    return version_dir
  from model.export import export_model  # pylint: disable=import-outside-toplevel
  from model.network import build_model  # pylint: disable=import-outside-toplevel
  shutil.rmtree(base, ignore_errors=True)
  written = export_model(build_model(image_size), base)
  assert os.path.samefile(written, version_dir), written
  _mark_done(base, {'image_size': image_size})
  return version_dir


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--work', default='/tmp/planet_bench')
  parser.add_argument('--count', type=int, default=10000)
  args = parser.parse_args(argv)
  print(chips(args.work, args.count))


if __name__ == '__main__':
  main()
