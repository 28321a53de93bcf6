"""The prediction job's summary: label and dead-letter statistics combined over all rows.

Usage (the job combines them per bundle: pipeline.CombinePerBundle):
  stats = row_batches_with_truth | beam.CombineGlobally(PredictionStatsFn())
  dead = dead_letters | beam.CombineGlobally(DeadLetterStatsFn())
  summary = trigger | beam.Map(build_summary, config, matched=..., stats=..., dead=...[, kinds=...])
"""
import collections
import time

import apache_beam as beam
import numpy as np

from beam_jobs.common.name_forms import mismatch_text
from beam_jobs.predict.config import JobConfig
from beam_jobs.predict.incremental import summary_block
from beam_jobs.predict.rows import rows_decisions
from model import manifest, metrics, schema

__all__ = ['DeadLetterStatsFn', 'PredictionStatsFn', 'build_summary']

_OTHER_FORM_EXAMPLES = 3


class PredictionStatsFn(beam.CombineFn):
  """Counts predicted labels and versions; with labels, the sums Kaggle's F2 and the rest need.

  Takes rows in batches: (rows, truths, other forms), `truths` a 17-vector of true labels per
  row (None for a row without) or None for a batch without labels, `other forms` the (name, CSV
  name) pairs of rows without labels whose CSV row writes the name in another Unicode form.
  """

  def create_accumulator(self):
    zeros = np.zeros(len(schema.ALL_LABELS), dtype=np.int64)
    return {'predictions': 0, 'predicted': zeros.copy(), 'versions': collections.Counter(),
            'labelled': 0, 'unlabelled': 0, 'f2_sum': 0.0, 'tp': zeros.copy(), 'fp': zeros.copy(),
            'fn': zeros.copy(), 'confusion': np.zeros((schema.NUM_WEATHER,) * 2, dtype=np.int64),
            'other_forms': 0, 'other_form_examples': []}

  def add_input(self, acc, element):
    """`element`: (rows, the true labels of each row or None for each, or None for all, the
    (name, CSV name) pairs of rows whose labels the CSV holds under another Unicode form)."""
    rows, truths, other_forms = element
    decided = rows_decisions(rows)
    acc['predictions'] += len(rows)
    acc['predicted'] += decided.sum(axis=0)
    acc['versions'].update(row['model_version'] for row in rows)
    labelled = [at for at, truth in enumerate(truths or ()) if truth is not None]
    acc['unlabelled'] += len(rows) - len(labelled)
    acc['other_forms'] += len(other_forms)
    acc['other_form_examples'] = (acc['other_form_examples']
                                  + list(other_forms))[:_OTHER_FORM_EXAMPLES]
    if not labelled:
      return acc
    truth, decided = np.array([truths[at] for at in labelled], dtype=bool), decided[labelled]
    acc['labelled'] += len(labelled)
    for f2 in metrics.f2_per_image(truth, decided).tolist():   # summed in row order, as one by one
      acc['f2_sum'] += f2
    acc['tp'] += (truth & decided).sum(axis=0)
    acc['fp'] += (~truth & decided).sum(axis=0)
    acc['fn'] += (truth & ~decided).sum(axis=0)
    weather = truth[:, :schema.NUM_WEATHER].any(axis=1)
    np.add.at(acc['confusion'], (truth[weather, :schema.NUM_WEATHER].argmax(axis=1),
                                 decided[weather, :schema.NUM_WEATHER].argmax(axis=1)), 1)
    return acc

  def merge_accumulators(self, accumulators):
    merged = self.create_accumulator()
    for acc in accumulators:
      for key, value in acc.items():
        merged[key] = merged[key] + value
    merged['other_form_examples'] = sorted(merged['other_form_examples'])[:_OTHER_FORM_EXAMPLES]
    return merged

  def extract_output(self, acc):
    return acc


class DeadLetterStatsFn(beam.CombineFn):
  """Counts dead letters by reason and keeps a few examples of each."""
  EXAMPLES_PER_REASON = 3

  def create_accumulator(self):
    return collections.Counter(), {}

  def add_input(self, acc, record):
    counts, examples = acc
    counts[record['reason']] += 1
    kept = examples.setdefault(record['reason'], [])
    if len(kept) < self.EXAMPLES_PER_REASON:
      kept.append(record)
    return acc

  def merge_accumulators(self, accumulators):
    counts, examples = collections.Counter(), {}
    for c, e in accumulators:
      counts.update(c)
      for reason, records in e.items():
        kept = examples.setdefault(reason, [])
        kept.extend(records[:self.EXAMPLES_PER_REASON - len(kept)])
    return counts, examples

  def extract_output(self, acc):
    counts, examples = acc
    return dict(counts), sorted((r for rs in examples.values() for r in rs),
                                key=lambda r: (r['reason'], r['image_name']))


def build_summary(_, config: JobConfig, matched: int, stats: dict, dead,
                  kinds: dict | None = None) -> dict:
  """The job's summary.json: counts, label distribution, versions, and the evaluation.

  Args:
    _: the one element of the trigger that runs this once the side inputs are complete.
    config: the job's configuration.
    matched: images matched by --input.
    stats: `PredictionStatsFn`'s output.
    dead: `DeadLetterStatsFn`'s output, (counts by reason, examples).
    kinds: with earlier rows (`config.carry`), how many images were carried over, resumed,
      predicted (new, changed, other model) or removed: the summary's `incremental`.
  """
  dead_counts, dead_examples = dead
  elapsed = time.time() - config.started_at
  predicted = {label: int(n) for label, n in zip(schema.ALL_LABELS, stats['predicted'])}
  summary = {
      'model_name': config.model_name,
      'model_versions': sorted(stats['versions']),
      'predictions_per_version': dict(sorted(stats['versions'].items())),
      'backend': config.backend,
      'signature': config.thresholds.signature,
      'label_rule': config.thresholds.label_rule,
      'image_size': config.image_size,
      'started_at': manifest.utc_timestamp(config.started_at),
      'elapsed_seconds': round(elapsed, 3),
      'images_per_second': round(stats['predictions'] / elapsed, 2) if elapsed > 0 else 0.0,
      'counts': {'images_matched': matched, 'predictions': stats['predictions'],
                 'dead_letters': sum(dead_counts.values())},
      'dead_letter_reasons': dict(sorted(dead_counts.items())),
      'dead_letter_examples': dead_examples,
      'predicted_label_counts': predicted,
  }
  if config.carry:
    summary['incremental'] = summary_block(kinds or {}, config.carry)
  if config.labels_csv:
    n = stats['labelled']
    summary['evaluation'] = {
        'labels_csv': config.labels_csv,
        'labelled_images': n,
        'unlabelled_images': stats['unlabelled'],
        # Unlabelled because the CSV writes the name in another Unicode normalization form.
        'unlabelled_other_form': stats['other_forms'],
        'unlabelled_other_form_examples': [
            {'image_name': name, 'csv_name': csv_name, 'why': mismatch_text(name, csv_name)}
            for name, csv_name in stats['other_form_examples']],
        'f2': stats['f2_sum'] / n if n else 0.0,
        'per_label': metrics.scores_from_counts(stats['tp'], stats['fp'], stats['fn']),
        'weather_labels': list(schema.WEATHER_LABELS),
        'weather_confusion': stats['confusion'].tolist(),
    }
  return summary
