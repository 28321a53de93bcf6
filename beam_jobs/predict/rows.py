"""The prediction job's pure row logic: image names, result rows, thresholds, submission.csv.

No Beam here: every function takes and returns plain values, so each is tested on its own.

Usage:
  batch = row_batch(result_rows(predicted, thresholds, model_name))   # lines encoded once
  name, line = submission_line(batch.rows[0])
"""
import csv
import hashlib
import io
import json
import logging
import posixpath
from typing import Iterable, NamedTuple, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems

from model import metrics, schema

__all__ = ['FORMULA_PREFIXES', 'RowBatch', 'ThresholdsByVersion', 'image_name', 'pick_path',
           'result_row', 'result_rows', 'row_batch', 'row_line', 'rows_decisions', 'spreadsheet_safe',
           'SUBMISSION_HEADER', 'csv_line', 'submission_line', 'thumbnail_key']

# A cell starting with one of these is run as a formula by spreadsheets (OWASP's CSV injection).
FORMULA_PREFIXES = ('=', '+', '-', '@', '\t', '\r')
_LABEL_INDEX = {label: at for at, label in enumerate(schema.ALL_LABELS)}


class ThresholdsByVersion:
  """How a run turns probabilities into tags, and which model made them: the ground thresholds
  and the model fingerprint of each model version (read from the export's planet.json and files),
  the label rule, and the signature whose outputs they decide.

  The in-process backend runs one version; through TF Serving a new version can appear mid-job,
  and its rows must be decided with its own thresholds and named by its own fingerprint. Without
  a readable export (gRPC without --model_dir) every version gets `default` thresholds and no
  fingerprint (its rows are then never reused). `label_rule` (schema.LABEL_RULES) and `signature`
  (serving_default, or serving_tta with --tta) are the run's, the same for every version.
  """

  def __init__(self, default: tuple[float, ...], versions_dir: str | None = None,
               known: dict[str, tuple[float, ...]] | None = None,
               label_rule: str = schema.DEFAULT_LABEL_RULE,
               signature: str = schema.SERVING_SIGNATURE,
               fingerprints: dict[str, str] | None = None):
    metrics.check_label_rule(label_rule)   # refused before the pipeline, not on a worker
    self._default = tuple(default)
    self._versions_dir = versions_dir
    self._known = {version: (tuple(values), (fingerprints or {}).get(version))
                   for version, values in (known or {}).items()}
    self.label_rule = label_rule
    self.signature = signature

  def __call__(self, version: str) -> tuple[float, ...]:
    return self._facts(version)[0]

  def fingerprint(self, version: str) -> str | None:
    """What model version `version` computes (export.model_fingerprint), None when unknown."""
    return self._facts(version)[1]

  def _facts(self, version: str) -> tuple[tuple[float, ...], str | None]:
    if version not in self._known:
      self._known[version] = self._read(version)
    return self._known[version]

  def _read(self, version: str) -> tuple[tuple[float, ...], str | None]:
    if not self._versions_dir:
      return self._default, None
    # saved_model_info imports TensorFlow: only a worker that meets a new version pays for it.
    from model.saved_model_info import ExportError, inspect_export  # pylint: disable=import-outside-toplevel
    try:
      export = inspect_export(FileSystems.join(self._versions_dir, version), verify=False)
      return export.ground_thresholds, export.fingerprint
    except (ExportError, OSError) as e:
      logging.warning('no thresholds for version %s (%s); using %s', version, e, self._default)
      return self._default, None


def image_name(path: str) -> str:
  """The key of an image from first read to last write: its file stem."""
  # posixpath: a string operation, the same on local and gs:// paths (FileSystems.split gives
  # the same last part, at 10 us an image for its file system lookup).
  return posixpath.splitext(posixpath.basename(path.rstrip('/')))[0]


def pick_path(name: str, paths: Iterable[str]) -> tuple[str, list[str]]:
  """One file per image name: the first path in sort order; the others are duplicates.

  A path listed twice (overlapping --input folders) is one file, never a duplicate of itself.
  """
  ordered = sorted(set(paths))
  return ordered[0], ordered[1:]


def result_row(name: str, path: str, inference: dict, thresholds: ThresholdsByVersion,
               model_name: str, sha256: str | None = None) -> dict:
  """One prediction row: probabilities by label name, the tags after its version's thresholds and
  the run's label rule, the model's fingerprint and the signature that predicted it, and the
  sha256 of the file bytes that were predicted (what --previous_output matches on)."""
  return result_rows([(name, path, sha256, inference)], thresholds, model_name)[0]


def result_rows(predicted: Sequence[tuple], thresholds: ThresholdsByVersion,
                model_name: str) -> list[dict]:
  """`result_row` of each (name, path, sha256, inference) of `predicted`, decided together.

  The tags of all rows of one model version are decided in one call (the job's rows come in
  batches: one `decide` per row cost more than the rest of the row).
  """
  if not predicted:
    return []
  versions = [str(inference['model_version']) for _, _, _, inference in predicted]
  weather = np.asarray([inference[schema.OUTPUT_WEATHER] for *_, inference in predicted],
                       dtype=float).reshape(len(predicted), schema.NUM_WEATHER)
  ground = np.asarray([inference[schema.OUTPUT_GROUND] for *_, inference in predicted],
                      dtype=float).reshape(len(predicted), len(schema.GROUND_LABELS))
  decisions = np.zeros((len(predicted), len(schema.ALL_LABELS)), dtype=bool)
  for version in set(versions):
    at = [i for i, v in enumerate(versions) if v == version]
    decisions[at] = metrics.decide(weather[at], ground[at], thresholds(version),
                                   thresholds.label_rule)
  rows = []
  for (name, path, sha256, _), version, weather_row, ground_row, decided in zip(
      predicted, versions, weather.tolist(), ground.tolist(), decisions):
    rows.append({
        'image_name': name,
        'path': path,
        'weather': dict(zip(schema.WEATHER_LABELS, weather_row)),
        'ground': dict(zip(schema.GROUND_LABELS, ground_row)),
        'tags': metrics.tags_of(decided),
        'model_name': model_name,
        'model_version': version,
        'model_fingerprint': thresholds.fingerprint(version),
        'signature': thresholds.signature,
        'sha256': sha256,
    })
  return rows


def row_line(row: dict) -> str:
  """A row's line of predictions-*.jsonl (and of the part files --resume reads)."""
  return json.dumps(row, sort_keys=True)


class RowBatch(NamedTuple):
  """Prediction rows travelling together through the job's outputs, with each row's line
  (`row_line`): every output takes the batch, so a row is encoded once and the per-element
  steps run once a batch. Never empty."""
  rows: list
  lines: list


def row_batch(rows: list[dict]) -> RowBatch:
  """`rows` (at least one) and their lines."""
  return RowBatch(rows, [row_line(row) for row in rows])


def rows_decisions(rows: Sequence[dict]) -> np.ndarray:
  """The rows' tags as a boolean [rows, 17] matrix in `schema.ALL_LABELS` order."""
  decided = np.zeros((len(rows), len(schema.ALL_LABELS)), dtype=bool)
  for at, row in enumerate(rows):
    for tag in row['tags']:
      if tag in _LABEL_INDEX:
        decided[at, _LABEL_INDEX[tag]] = True
  return decided


def spreadsheet_safe(cell: str) -> str:
  """A cell a spreadsheet shows as text: a leading formula character gets an apostrophe.

  The rule of submission.csv only (docs/predict.md): `=cmd` is written `'=cmd`. Every other output
  (predictions-*.jsonl, summary.json, the report) keeps the name exactly.
  """
  return "'" + cell if cell.startswith(FORMULA_PREFIXES) else cell


def csv_line(fields: list[str]) -> str:
  """One line of submission.csv, RFC 4180 quoting, CRLF included (then CR and LF in a name are
  quoted too, and a name with a comma, a quote or a line break stays one field)."""
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator='\r\n').writerow(fields)
  return buffer.getvalue()


SUBMISSION_HEADER = csv_line(['image_name', 'tags'])


def submission_line(row) -> tuple[str, str]:
  """A prediction row -> (its image name, the sort key; its line of submission.csv)."""
  name = row['image_name']
  return name, csv_line([spreadsheet_safe(name), ' '.join(row['tags'])])


def thumbnail_key(item) -> str:
  """A deterministic, content-independent sample of images for the report.

  `item` is (key, value) where the key starts with the image name: ((name, path, sha256), ...).
  """
  name = item[0][0]
  return hashlib.sha256(name.encode()).hexdigest()
