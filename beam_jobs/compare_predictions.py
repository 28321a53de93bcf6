"""Checks that two prediction outputs agree: same images, probabilities, tags and dead letters.

Usage: python -m beam_jobs.compare_predictions OUT_A OUT_B [--tolerance 1e-5]

run_local.sh uses it to show that the in-process and the TF Serving backends give the same
results; exits 1 and lists the differences otherwise. Each side must be a finished prediction
output (its manifest written) with prediction rows; two outputs whose rows were predicted by
different models (their `model_fingerprint`s differ) are refused, since their differences would
say nothing about the backends. Either is one line and exit 1.
"""
import json
import sys

from apache_beam.io.filesystems import FileSystems

from model import command_line, manifest, schema

__all__ = ['DifferentModels', 'OutputUnusable', 'compare_outputs', 'main',
           'read_prediction_output']

PREDICTIONS = f'{schema.PREDICTIONS_PREFIX}-*.jsonl'
DEAD_LETTERS = f'{schema.DEAD_LETTERS_DIR}/*.jsonl'
HEADS = ('weather', 'ground')
FINGERPRINT_FIELD = 'model_fingerprint'


class OutputUnusable(ValueError):
  """One side is not a finished prediction output with readable rows; the message names it."""


class DifferentModels(ValueError):
  """The two sides' rows were predicted by different models: comparing them is meaningless."""


def _read_jsonl(pattern: str, side: str) -> list[dict]:
  """The JSON objects of every file matching `pattern`; a bad line names its file and number."""
  records = []
  for metadata in sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path):
    try:
      with FileSystems.open(metadata.path) as f:
        text = f.read().decode('utf-8')
    except (OSError, UnicodeDecodeError) as e:
      raise OutputUnusable(
          f'{side}: cannot read {metadata.path} ({command_line.short(e)})') from None
    for number, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise OutputUnusable(
            f'{side}: line {number} of {metadata.path} is not JSON ({e.msg}; truncated or '
            'edited?): run the prediction job again with --overwrite') from None
      if not isinstance(record, dict) or not isinstance(record.get('image_name'), str):
        raise OutputUnusable(f'{side}: line {number} of {metadata.path} has no image_name: it is '
                             'not a line the prediction job writes')
      records.append((metadata.path, number, record))
  return records


def _check_row(path: str, number: int, row: dict, side: str) -> dict:
  for head in HEADS:
    probabilities = row.get(head)
    if not isinstance(probabilities, dict) or not all(
        isinstance(p, (int, float)) for p in probabilities.values()):
      raise OutputUnusable(f'{side}: line {number} of {path} has no {head} probabilities: it is '
                           'not a line the prediction job writes')
  return row


def read_prediction_output(out: str, side: str) -> tuple[dict[str, dict], list[tuple[str, str]]]:
  """A finished prediction output's rows by image name and its (image name, reason) dead letters.

  Args:
    out: the prediction job's --output_dir.
    side: how messages name it ('OUT_A').

  Raises:
    OutputUnusable: `out` is missing, unfinished, another stage's, has no prediction rows, or a
      line that cannot be read.
  """
  try:
    manifest.read_manifest(out, expected_stage=schema.STAGE_PREDICT)
  except manifest.ManifestMissing as e:
    if not FileSystems.match([FileSystems.join(out, '*')])[0].metadata_list:
      raise OutputUnusable(f'{side}: {out} does not exist or is empty: give a prediction job\'s '
                           '--output_dir') from None
    raise OutputUnusable(f'{side}: not a finished prediction output: {e}') from None
  except ValueError as e:   # another stage's manifest, or one that is not JSON
    raise OutputUnusable(f'{side}: {command_line.short(e)}') from None
  rows = {}
  for path, number, row in _read_jsonl(FileSystems.join(out, PREDICTIONS), side):
    rows[row['image_name']] = _check_row(path, number, row, side)
  if not rows:
    raise OutputUnusable(f'{side}: {out} has no prediction rows ({PREDICTIONS}): nothing to '
                         'compare')
  dead = sorted((d['image_name'], str(d.get('reason'))) for _, _, d in _read_jsonl(
      FileSystems.join(out, DEAD_LETTERS), side))
  return rows, dead


def _check_same_models(rows_a: dict, rows_b: dict) -> None:
  """Refuses rows of one image predicted by two different models (where both rows say which:
  outputs written before rows had fingerprints are compared as they are)."""
  different = [name for name in sorted(rows_a.keys() & rows_b.keys())
               if FINGERPRINT_FIELD in rows_a[name] and FINGERPRINT_FIELD in rows_b[name]
               and rows_a[name][FINGERPRINT_FIELD] != rows_b[name][FINGERPRINT_FIELD]]
  if different:
    name = different[0]
    raise DifferentModels(
        f'the outputs come from different models ({len(different)} '
        f'image{"s" if len(different) != 1 else ""}, e.g. {name}: model '
        f'fingerprint {command_line.short(rows_a[name][FINGERPRINT_FIELD], 20)} in OUT_A, '
        f'{command_line.short(rows_b[name][FINGERPRINT_FIELD], 20)} in OUT_B): comparing '
        'backends needs both runs on the same export')


def compare_outputs(out_a: str, out_b: str, tolerance: float = 1e-5) -> tuple[list[str], dict]:
  """Returns (differences, counts); no differences means the outputs agree.

  Raises:
    OutputUnusable: a side that is not a finished prediction output with readable rows.
    DifferentModels: rows of the same image predicted by different models.
  """
  rows_a, dead_a = read_prediction_output(out_a, 'OUT_A')
  rows_b, dead_b = read_prediction_output(out_b, 'OUT_B')
  _check_same_models(rows_a, rows_b)
  differences = [f'{name}: predicted only in {out_a}'
                 for name in sorted(rows_a.keys() - rows_b.keys())]
  differences += [f'{name}: predicted only in {out_b}'
                  for name in sorted(rows_b.keys() - rows_a.keys())]
  largest = 0.0
  for name in sorted(rows_a.keys() & rows_b.keys()):
    a, b = rows_a[name], rows_b[name]
    for head in HEADS:
      if a[head].keys() != b[head].keys():
        differences.append(
            f'{name}: {head} labels differ: {sorted(a[head].keys() ^ b[head].keys())}')
        continue
      gap = max((abs(a[head][label] - b[head][label]) for label in a[head]), default=0.0)
      largest = max(largest, gap)
      if gap > tolerance:
        differences.append(f'{name}: {head} probabilities differ by {gap:.2e}')
    if a.get('tags') != b.get('tags'):
      differences.append(f'{name}: tags {a.get("tags")} != {b.get("tags")}')
  if dead_a != dead_b:
    differences.append(f'dead letters differ: {sorted(set(dead_a) ^ set(dead_b))[:10]}')
  counts = {'predictions': len(rows_a), 'dead_letters': len(dead_a), 'max_difference': largest}
  return differences, counts


def _compare(argv) -> None:
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


def main(argv=None) -> None:
  """The command: an unusable side or different models is one line and exit 1."""
  command_line.run_command('compare', lambda: _compare(argv),
                           refusals=(OutputUnusable, DifferentModels))


if __name__ == '__main__':
  command_line.quiet_third_party()
  main()
