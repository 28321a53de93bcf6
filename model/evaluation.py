"""model.train's evaluation: thresholds tuned on one half of the eval split, scored on the other.

The preprocess job writes two splits, train and eval. Thresholds tuned on the chips they are
scored on give an optimistic F2, so the eval split is cut in two by a hash of the image name
(`model.dataset.eval_half`): the ground thresholds are tuned on the *tuning* half only, and the
*honest* F2 is the one those thresholds reach on the *test* half, which influenced nothing.

Usage:
  predictions = predict_split(model, make_dataset(data, 'eval', 32, training=False,
                                                  with_names=True))
  evaluation = evaluate(predictions, train_label_frequencies)
  evaluation['mean_f2_honest'], evaluation['ground_thresholds']
"""
import numpy as np

from model import dataset as dataset_lib
from model import metrics as metrics_lib
from model import schema

__all__ = ['BASELINE_MIN_FREQUENCY', 'describe_evaluation', 'evaluate', 'HALVES_RULE',
           'predict_split', 'prior_baseline']

# The prior-only baseline predicts every label at least this common in the training labels.
BASELINE_MIN_FREQUENCY = 0.2
HALVES_RULE = ("sha256('eval-half:' + image name), first 8 bytes as a fraction of 2**64: below "
               '0.5 tuning, else test (model.dataset.eval_half)')
_TUNING, _TEST = schema.EVAL_HALVES


def predict_split(model, dataset) -> dict[str, np.ndarray]:
  """Runs the model over a one-pass split made `with_names=True`; returns the image names, true
  labels and probabilities, in order."""
  parts = {k: [] for k in ('names', 'weather_true', 'ground_true', 'weather_probs',
                           'ground_probs')}
  for images, targets, _, names in dataset:
    outputs = model(images, training=False)
    parts['names'].append(np.char.decode(names.numpy().astype(bytes), 'utf-8'))
    parts['weather_true'].append(targets[schema.OUTPUT_WEATHER].numpy())
    parts['ground_true'].append(targets[schema.OUTPUT_GROUND].numpy())
    parts['weather_probs'].append(np.asarray(outputs[schema.OUTPUT_WEATHER]))
    parts['ground_probs'].append(np.asarray(outputs[schema.OUTPUT_GROUND]))
  return {k: np.concatenate(v) for k, v in parts.items()}


def prior_baseline(train_frequencies: dict[str, float], y_true: np.ndarray) -> dict:
  """F2 of predicting, for every image, each label whose train frequency is above 0.2."""
  labels = [l for l in schema.ALL_LABELS if train_frequencies[l] > BASELINE_MIN_FREQUENCY]
  prediction = np.array([l in labels for l in schema.ALL_LABELS], dtype=bool)
  return {
      'rule': f'predict every label whose train frequency is above {BASELINE_MIN_FREQUENCY}',
      'labels': labels,
      'mean_f2': metrics_lib.mean_f2(y_true, np.broadcast_to(prediction, y_true.shape)),
  }


def evaluate(predictions: dict[str, np.ndarray], train_frequencies: dict[str, float],
             label_rule: str = schema.DEFAULT_LABEL_RULE) -> dict:
  """Kaggle's F2 with thresholds tuned on the tuning half, scored on each half; per-label scores,
  confusion and the baseline on the test half.

  Keys of the result (each F2 is None for an empty half):
    mean_f2_honest: the test half at the tuned thresholds, with `label_rule`: the figure to quote.
    mean_f2: the tuning half at the thresholds tuned on it (optimistic, as any tuned score).
    mean_f2_default_thresholds: the test half at 0.2 for every ground label.
    mean_f2_honest_without_label_rule: the test half at the tuned thresholds, label rule `none`.
  """
  names = predictions['names']
  tuning = np.array([dataset_lib.eval_half(str(n)) == _TUNING for n in names], dtype=bool)
  test = ~tuning
  y_true = np.concatenate([predictions['weather_true'], predictions['ground_true']], axis=1)
  weather_probs, ground_probs = predictions['weather_probs'], predictions['ground_probs']

  def decided(half, thresholds, rule=label_rule):
    return metrics_lib.decide(weather_probs[half], ground_probs[half], thresholds, rule)

  def f2(half, thresholds, rule=label_rule):
    if not half.any():
      return None
    return metrics_lib.mean_f2(y_true[half], decided(half, thresholds, rule))

  tuned = metrics_lib.best_ground_thresholds(y_true[tuning], weather_probs[tuning],
                                             ground_probs[tuning], label_rule=label_rule)
  default = [schema.DEFAULT_GROUND_THRESHOLD] * schema.NUM_GROUND
  return {
      'examples': int(len(y_true)),
      'halves': {'rule': HALVES_RULE, f'{_TUNING}_examples': int(tuning.sum()),
                 f'{_TEST}_examples': int(test.sum())},
      'label_rule': label_rule,
      'mean_f2_honest': f2(test, tuned),
      'mean_f2': f2(tuning, tuned),
      'mean_f2_default_thresholds': f2(test, default),
      'mean_f2_honest_without_label_rule': f2(test, tuned, schema.LABEL_RULE_NONE),
      'ground_thresholds': dict(zip(schema.GROUND_LABELS, tuned)),
      'per_label': metrics_lib.per_label_scores(y_true[test], decided(test, tuned)),
      'weather_confusion': {'labels': list(schema.WEATHER_LABELS),
                            'rows_true_columns_predicted': metrics_lib.weather_confusion(
                                predictions['weather_true'][test], weather_probs[test])},
      'baseline': prior_baseline(train_frequencies, y_true[test]),
  }


def describe_evaluation(evaluation: dict) -> str:
  """The evaluation in one line: the honest F2 first, then the figures to read it against."""
  def f2(key):
    value = evaluation[key]
    return 'n/a' if value is None else f'{value:.4f}'

  halves = evaluation['halves']
  return (f'honest eval F2 {f2("mean_f2_honest")} ({halves["test_examples"]} test-half chips, '
          f'thresholds tuned on the other {halves["tuning_examples"]}, where they score '
          f'{f2("mean_f2")}), {f2("mean_f2_default_thresholds")} at 0.2; label rule '
          f'{evaluation["label_rule"]} ({f2("mean_f2_honest_without_label_rule")} without); '
          f'prior-only baseline {evaluation["baseline"]["mean_f2"]:.4f}')

