"""Checks that two prediction outputs agree: same images, probabilities, tags and dead letters.

Usage: python -m beam_jobs.compare_predictions OUT_A OUT_B [--tolerance 1e-5]

run_local.sh uses it to show that the in-process and the TF Serving backends give the same
results; exits 1 and lists the differences otherwise.
"""
import json
import sys

from apache_beam.io.filesystems import FileSystems

from model import command_line, schema

__all__ = ['compare_outputs', 'main']

PREDICTIONS = f'{schema.PREDICTIONS_PREFIX}-*.jsonl'
DEAD_LETTERS = f'{schema.DEAD_LETTERS_DIR}/*.jsonl'


def _read_jsonl(pattern: str) -> list[dict]:
  records = []
  for metadata in FileSystems.match([pattern])[0].metadata_list:
    with FileSystems.open(metadata.path) as f:
      records.extend(json.loads(line) for line in f.read().decode('utf-8').splitlines() if line)
  return records


def compare_outputs(out_a: str, out_b: str, tolerance: float = 1e-5) -> tuple[list[str], dict]:
  """Returns (differences, counts); no differences means the outputs agree."""
  rows_a = {r['image_name']: r for r in _read_jsonl(FileSystems.join(out_a, PREDICTIONS))}
  rows_b = {r['image_name']: r for r in _read_jsonl(FileSystems.join(out_b, PREDICTIONS))}
  differences = [f'{name}: predicted only in {out_a}' for name in sorted(rows_a.keys() - rows_b.keys())]
  differences += [f'{name}: predicted only in {out_b}' for name in sorted(rows_b.keys() - rows_a.keys())]
  largest = 0.0
  for name in sorted(rows_a.keys() & rows_b.keys()):
    a, b = rows_a[name], rows_b[name]
    for head, labels in (('weather', schema.WEATHER_LABELS), ('ground', schema.GROUND_LABELS)):
      gap = max(abs(a[head][label] - b[head][label]) for label in labels)
      largest = max(largest, gap)
      if gap > tolerance:
        differences.append(f'{name}: {head} probabilities differ by {gap:.2e}')
    if a['tags'] != b['tags']:
      differences.append(f'{name}: tags {a["tags"]} != {b["tags"]}')

  def dead(out):
    return sorted((d['image_name'], d['reason']) for d in _read_jsonl(
        FileSystems.join(out, DEAD_LETTERS)))
  dead_a, dead_b = dead(out_a), dead(out_b)
  if dead_a != dead_b:
    differences.append(f'dead letters differ: {sorted(set(dead_a) ^ set(dead_b))[:10]}')
  counts = {'predictions': len(rows_a), 'dead_letters': len(dead_a), 'max_difference': largest}
  return differences, counts


def main(argv=None):
  parser = command_line.ArgumentParser(prog='python -m beam_jobs.compare_predictions',
                                       description=__doc__.split('\n')[0])
  parser.add_argument('out_a')
  parser.add_argument('out_b')
  parser.add_argument('--tolerance', type=float, default=1e-5)
  args = parser.parse_args(argv)
  differences, counts = compare_outputs(args.out_a, args.out_b, args.tolerance)
  if differences:
    print(f'compare: the outputs DIFFER in {len(differences)} places:', file=sys.stderr)
    for line in differences[:20]:
      print(f'  {line}', file=sys.stderr)
    sys.exit(1)
  print(f'compare: the two backends agree on {counts["predictions"]} predictions (largest '
        f'probability difference {counts["max_difference"]:.1e}) and {counts["dead_letters"]} '
        'dead letters')


if __name__ == '__main__':
  command_line.quiet_third_party()
  main()
