"""Incremental and resumable prediction as pure rules: which earlier rows an image may reuse.

An earlier row is reused only when it is exactly what this run would predict: the same image
name, the same file bytes (the sha256 of the file, which every prediction row records), the same
model (its fingerprint: what it computes, not only its name and version, since two fresh export
bases both start at version 1), the same signature (serving_default, or serving_tta with --tta),
and the same ground thresholds and label rule. Earlier rows come from two places:

- --previous_output OUT_PREV, a finished prediction output read through its manifest: rows
  reused from it are *carried*; its images that are gone from the inputs are *removed*.
- --resume: the part files an unfinished run of this same job kept (`completed_rows`): rows
  reused from them are *resumed*.

Every other image is predicted, as *new* (no earlier row), *changed* (its bytes, or its row,
differ) or *other_model* (its earlier row came from another model version or thresholds).

A reused row is rebuilt by `rows.result_row` from its stored probabilities, at the image's path
now: it is the row a fresh prediction with those probabilities makes, and a row whose tags do not
follow from its probabilities (edited by hand) is not reused.

Usage:
  previous = read_previous_output(args.previous_output)     # refusals before anything runs
  plan = plan_carry_over(previous, list_completed(out), model_name, version, thresholds)
  kind, value = decide(name, current, previous_rows, completed_rows, plan, thresholds)
"""
import dataclasses
import fnmatch
import hashlib
import json
import os

from apache_beam.io.filesystems import FileSystems

from beam_jobs.predict.config import PREDICTION_FILES
from beam_jobs.predict.rows import ThresholdsByVersion, result_row
from model import manifest, schema

__all__ = ['CARRIED', 'CHANGED', 'FINGERPRINT', 'INFERRED_KINDS', 'NEW', 'OTHER_MODEL',
           'REMOVED', 'RESUMED', 'CarryPlan', 'PreviousOutput', 'decide', 'describe',
           'fingerprint', 'job_identity', 'parse_known_row', 'plan_carry_over',
           'read_previous_output', 'reuse_row', 'row_inference', 'summary_block']

# What the manifest says the rows' `sha256` is: an output without it has no usable fingerprints.
FINGERPRINT = 'sha256 of the file bytes'
CARRIED, RESUMED, REMOVED = 'carried', 'resumed', 'removed'
NEW, CHANGED, OTHER_MODEL = 'new', 'changed', 'other_model'
INFERRED_KINDS = (NEW, CHANGED, OTHER_MODEL)
_LABELS = {'weather': frozenset(schema.WEATHER_LABELS), 'ground': frozenset(schema.GROUND_LABELS)}


def fingerprint(data: bytes) -> str:
  """An image file's fingerprint: the sha256 of its bytes (exact, and cheap next to decoding)."""
  return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class PreviousOutput:
  """A finished prediction output, as its manifest describes it."""
  path: str
  prediction_files: tuple[str, ...]
  model_name: str | None
  ground_thresholds: dict          # version -> thresholds the rows of that version were decided by
  fingerprinted: bool
  signature: str                   # the signature and label rule its rows were made with
  label_rule: str
  model_fingerprints: dict = dataclasses.field(default_factory=dict)   # version -> fingerprint


@dataclasses.dataclass(frozen=True)
class CarryPlan:
  """Where this run's earlier rows are, and which of them may be reused.

  Attributes:
    model_name, version: the model this run predicts with; only its rows are reused.
    model_fingerprint: what that model computes; None (unknown: rows never reused) through a
      server without --model_dir.
    previous_output: --previous_output, or None.
    previous_files: its predictions-*.jsonl files.
    carry_previous: whether its rows may be reused at all (same model and thresholds).
    completed_files: the part files an unfinished run of this job kept (--resume).
    note: one line on why no row of --previous_output is reused, or None.
  """
  model_name: str
  version: str
  model_fingerprint: str | None = None
  previous_output: str | None = None
  previous_files: tuple[str, ...] = ()
  carry_previous: bool = False
  completed_files: tuple[str, ...] = ()
  note: str | None = None


def read_previous_output(path: str) -> PreviousOutput:
  """Reads --previous_output's manifest and checks that every predictions file it lists is there.

  Raises:
    ManifestMissing: the folder has no manifest (a run that did not finish).
    ValueError: the manifest is another stage's.
    FileNotFoundError: a predictions file the manifest lists is missing.
  """
  record = manifest.read_manifest(path, expected_stage=schema.STAGE_PREDICT)
  listed = [f for f in record.get('outputs') or [] if fnmatch.fnmatchcase(f, PREDICTION_FILES)]
  files = tuple(FileSystems.join(path, f) for f in sorted(listed))
  for file in files:
    if not FileSystems.exists(file):
      raise FileNotFoundError(
          f'--previous_output {path}: its manifest lists {file}, which is missing: the folder '
          'changed after the run that wrote it; give a complete prediction output')
    if manifest.is_local_path(file) and not os.path.isfile(file):
      raise ValueError(f'--previous_output {path}: {file} is not a regular file (a FIFO or a '
                       'device would never end); give a complete prediction output')
  model = record.get('model') or {}
  thresholds = {str(version): tuple(float(t) for t in values)
                for version, values in (model.get('ground_thresholds') or {}).items()}
  # Outputs written before these were recorded predicted with serving_default, without a rule.
  fingerprints = model.get('fingerprints')
  return PreviousOutput(path, files, model.get('name'), thresholds,
                        record.get('row_fingerprint') == FINGERPRINT,
                        model.get('signature', schema.SERVING_SIGNATURE),
                        model.get('label_rule', schema.LABEL_RULE_NONE),
                        dict(fingerprints) if isinstance(fingerprints, dict) else {})


def _why_not_carried(previous: PreviousOutput, model_name: str, version: str,
                     model_fingerprint: str | None, thresholds: tuple[float, ...], signature: str,
                     label_rule: str) -> str | None:
  where = f'--previous_output {previous.path}'
  if not previous.fingerprinted:
    return (f'{where} was written before rows recorded their file\'s sha256: every image is '
            'predicted again')
  if previous.model_name != model_name:
    return (f'{where} was predicted by model {previous.model_name}, this run uses {model_name}: '
            'every image is predicted again')
  if version not in previous.ground_thresholds:
    seen = ', '.join(sorted(previous.ground_thresholds)) or 'none'
    return (f'{where} was predicted by {model_name} version {seen}, this run uses version '
            f'{version}: every image is predicted again')
  if model_fingerprint is None:
    return (f'{where}: this run does not know what its model computes (a server without '
            '--model_dir), so no earlier row can be matched to it: every image is predicted '
            'again. Give --model_dir, the export folder the server serves')
  recorded = previous.model_fingerprints.get(version)
  if recorded is None:
    return (f'{where} was written before rows recorded their model\'s fingerprint: every image '
            'is predicted again')
  if recorded != model_fingerprint:
    return (f'{where} was predicted by another model than this run\'s: both are called '
            f'{model_name} version {version}, but they compute different things (fingerprints '
            f'{recorded} and {model_fingerprint}): every image is predicted again')
  if previous.ground_thresholds[version] != tuple(thresholds):
    return (f'{where} decided version {version}\'s ground labels with other thresholds than this '
            'run: every image is predicted again')
  if previous.signature != signature:
    return (f'{where} was predicted with signature {previous.signature}, this run uses '
            f'{signature}: every image is predicted again')
  if previous.label_rule != label_rule:
    return (f'{where} decided its tags with label rule {previous.label_rule}, this run uses '
            f'{label_rule}: every image is predicted again')
  return None


def plan_carry_over(previous: PreviousOutput | None, completed_files: tuple[str, ...],
                    model_name: str, version: str, thresholds: ThresholdsByVersion
                    ) -> CarryPlan | None:
  """The plan for this run's earlier rows; None when there are none (every image is new)."""
  if previous is None and not completed_files:
    return None
  model_fingerprint = thresholds.fingerprint(version)
  note = previous and _why_not_carried(previous, model_name, version, model_fingerprint,
                                       thresholds(version), thresholds.signature,
                                       thresholds.label_rule)
  return CarryPlan(model_name, version, model_fingerprint,
                   previous_output=previous.path if previous else None,
                   previous_files=previous.prediction_files if previous else (),
                   carry_previous=previous is not None and note is None,
                   completed_files=tuple(completed_files), note=note)


def job_identity(input_paths: list[str], model_dir: str | None, serving_address: str | None,
                 model_name: str) -> dict:
  """What makes a run the same job for --resume: its images and its model (JSON values)."""
  return {'inputs': sorted(input_paths), 'model_dir': model_dir,
          'serving_address': serving_address, 'model_name': model_name}


def parse_known_row(line: str) -> dict | None:
  """An earlier prediction row, or None when the line cannot be one (it is then never reused)."""
  try:
    row = json.loads(line)
  except ValueError:
    return None
  if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in (
      'image_name', 'path', 'model_name', 'model_version')):
    return None
  if not isinstance(row.setdefault('sha256', None), (str, type(None))):
    return None   # a row written before rows had fingerprints has none: never reused
  if not isinstance(row.setdefault('signature', schema.SERVING_SIGNATURE), str):
    return None   # rows written before rows named theirs came from serving_default
  if not isinstance(row.setdefault('model_fingerprint', None), (str, type(None))):
    return None   # a row written before rows named their model's is never reused
  for head, labels in _LABELS.items():
    probabilities = row.get(head)
    # JSON numbers are int or float (never bool): anything else is not a probability.
    if (not isinstance(probabilities, dict) or probabilities.keys() != labels
        or not all(type(p) in (float, int) for p in probabilities.values())):
      return None
  return row


def row_inference(row: dict) -> dict:
  """A row's probabilities and version as a backend answers them (what `result_row` takes)."""
  return {schema.OUTPUT_WEATHER: [row['weather'][label] for label in schema.WEATHER_LABELS],
          schema.OUTPUT_GROUND: [row['ground'][label] for label in schema.GROUND_LABELS],
          'model_version': row['model_version']}


def reuse_row(row: dict, path: str, thresholds: ThresholdsByVersion) -> dict | None:
  """`row` rebuilt from its probabilities at `path`, or None when it is not what that gives."""
  rebuilt = result_row(row['image_name'], path, row_inference(row), thresholds,
                       row['model_name'], sha256=row['sha256'])
  return rebuilt if rebuilt == {**row, 'path': path} else None


def decide(name: str, current: list, previous: list[dict], completed: list[dict],
           plan: CarryPlan, thresholds: ThresholdsByVersion):
  """What happens to one image name, given everything known about it.

  Args:
    name: the image name.
    current: [(path, sha256)] for the image in the inputs now (sha256 None: unreadable, so it
      goes on to be predicted and dead-lettered there); empty when it is gone.
    previous: its rows in --previous_output; completed: its rows kept by an unfinished run.
    plan: the run's `CarryPlan`.
    thresholds: this run's thresholds.

  Returns:
    (CARRIED or RESUMED, the reused row), (NEW, CHANGED or OTHER_MODEL, (name, path)) to
    predict, (REMOVED, {'image_name', 'path'}), or None (only kept rows of a name now gone).
  """
  if not current:
    return (REMOVED, {'image_name': name, 'path': previous[0]['path']}) if previous else None
  path, sha256 = current[0]
  for kind, rows, usable in ((RESUMED, completed, True),
                             (CARRIED, previous, plan.carry_previous)):
    for row in rows if usable and sha256 and plan.model_fingerprint else ():
      if (row['sha256'], row['model_name'], row['model_version'], row['model_fingerprint']) == (
          sha256, plan.model_name, plan.version, plan.model_fingerprint):
        reused = reuse_row(row, path, thresholds)
        if reused is not None:
          return kind, reused
  if not previous:
    kind = NEW
  elif plan.carry_previous and any((row['model_name'], row['model_version'])
                                   == (plan.model_name, plan.version) for row in previous):
    kind = CHANGED
  else:
    kind = OTHER_MODEL
  return kind, (name, path)


def summary_block(kind_counts: dict, plan: CarryPlan) -> dict:
  """summary.json's `incremental`: how many rows were reused, predicted (and why), removed."""
  block = {kind: int(kind_counts.get(kind, 0))
           for kind in (CARRIED, RESUMED, *INFERRED_KINDS, REMOVED)}
  block['previous_output'] = plan.previous_output
  block['note'] = plan.note
  return block


def describe(block: dict) -> str:
  """The block in one line, for the job's last lines and the report."""
  return (f'{block[CARRIED]} carried over, {block[RESUMED]} resumed, {block[NEW]} new, '
          f'{block[CHANGED]} changed and {block[OTHER_MODEL]} of another model predicted, '
          f'{block[REMOVED]} removed')
