"""Kaggle's metric (F2 averaged over images), per-label scores, and F2-maximising thresholds.

Plain NumPy so the training module, the prediction job and the tests compute the same figures.
Label matrices are [images, 17]: the 4 weather columns then the 13 ground columns (schema order).
"""
import numpy as np

from model import schema

__all__ = [
    'best_ground_thresholds', 'BETA', 'check_label_rule', 'decide', 'f2_per_image', 'mean_f2',
    'per_label_scores', 'scores_from_counts', 'tags_of', 'weather_confusion'
]

BETA = 2.0
_CLOUDY = schema.WEATHER_LABELS.index('cloudy')


def _fbeta(tp, fp, fn):
  b2 = BETA * BETA
  denominator = (1 + b2) * tp + b2 * fn + fp
  # scikit-learn's convention (zero_division=0): no true and no predicted label scores 0.
  return np.divide((1 + b2) * tp, denominator, out=np.zeros_like(denominator, dtype=float),
                   where=denominator > 0)


def f2_per_image(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
  """F2 of each image (row): fbeta_score(..., beta=2, average='samples') before the mean."""
  y_true, y_pred = np.asarray(y_true, bool), np.asarray(y_pred, bool)
  tp = (y_true & y_pred).sum(axis=1).astype(float)
  fp = (~y_true & y_pred).sum(axis=1).astype(float)
  fn = (y_true & ~y_pred).sum(axis=1).astype(float)
  return _fbeta(tp, fp, fn)


def mean_f2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """Kaggle's Planet metric: F2 averaged over images."""
  return float(f2_per_image(y_true, y_pred).mean()) if len(y_true) else 0.0


def per_label_scores(y_true: np.ndarray, y_pred: np.ndarray,
                     labels=schema.ALL_LABELS) -> dict[str, dict[str, float]]:
  """Precision, recall and F2 of each label (column), with its support and predicted count."""
  y_true, y_pred = np.asarray(y_true, bool), np.asarray(y_pred, bool)
  return scores_from_counts((y_true & y_pred).sum(axis=0), (~y_true & y_pred).sum(axis=0),
                            (y_true & ~y_pred).sum(axis=0), labels)


def scores_from_counts(tp, fp, fn, labels=schema.ALL_LABELS) -> dict[str, dict[str, float]]:
  """Per-label precision, recall, F2, support and predicted count from summed tp/fp/fn counts.

  Split from `per_label_scores` so a distributed job can sum the counts and score at the end.
  """
  tp, fp, fn = (np.asarray(c, dtype=float) for c in (tp, fp, fn))
  precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
  recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
  f2 = _fbeta(tp, fp, fn)
  return {label: {'precision': float(precision[i]), 'recall': float(recall[i]),
                  'f2': float(f2[i]), 'support': int(tp[i] + fn[i]),
                  'predicted': int(tp[i] + fp[i])}
          for i, label in enumerate(labels)}


def decide(weather_probs: np.ndarray, ground_probs: np.ndarray, thresholds,
           label_rule: str = schema.DEFAULT_LABEL_RULE) -> np.ndarray:
  """Turns probabilities into a [images, 17] 0/1 matrix: weather by argmax, ground by threshold.

  The one place tags are decided, for training's evaluation and every prediction backend alike.
  `label_rule` (schema.LABEL_RULES) then applies the labels' structure: with
  `cloudy_no_ground` (the default) a chip whose decided weather is `cloudy` gets no ground tag,
  since in the real labels `cloudy` never appears with another tag; `none` leaves the ground
  tags as the thresholds decided them.

  Raises:
    ValueError: an unknown label rule.
  """
  check_label_rule(label_rule)
  weather_probs = np.asarray(weather_probs)
  weather = np.zeros(weather_probs.shape, dtype=bool)
  if len(weather_probs):
    weather[np.arange(len(weather_probs)), weather_probs.argmax(axis=1)] = True
  ground = np.asarray(ground_probs) > np.asarray(thresholds, dtype=float)[None, :]
  if label_rule == schema.LABEL_RULE_CLOUDY_NO_GROUND:
    ground &= ~weather[:, [_CLOUDY]]
  return np.concatenate([weather, ground], axis=1)


def check_label_rule(label_rule: str) -> None:
  """Raises ValueError for a name that is not one of schema.LABEL_RULES."""
  if label_rule not in schema.LABEL_RULES:
    raise ValueError(f'unknown label rule {label_rule!r}; known: {", ".join(schema.LABEL_RULES)}')


def tags_of(decisions_row) -> list[str]:
  return [label for label, on in zip(schema.ALL_LABELS, decisions_row) if on]


def best_ground_thresholds(y_true: np.ndarray, weather_probs: np.ndarray,
                           ground_probs: np.ndarray, start: float = schema.DEFAULT_GROUND_THRESHOLD,
                           rounds: int = 3,
                           label_rule: str = schema.DEFAULT_LABEL_RULE) -> list[float]:
  """Per-label ground thresholds that maximise mean F2, by coordinate ascent from `start`.

  One label at a time, every threshold on a 0.01 grid is tried with the others held fixed; a few
  rounds over all labels converge in practice. Ties keep the threshold closest to `start`, so a
  label the eval set never shows stays at the default. Tags are decided as predictions will
  decide them, `label_rule` included.
  """
  grid = np.round(np.arange(0.01, 1.0, 0.01), 2)

  def score(trial):
    return mean_f2(y_true, decide(weather_probs, ground_probs, trial, label_rule))

  thresholds = np.full(schema.NUM_GROUND, start, dtype=float)
  for _ in range(rounds):
    changed = False
    for j in range(schema.NUM_GROUND):
      best, best_score = thresholds[j], score(thresholds)
      for candidate in sorted(grid, key=lambda t: abs(t - start)):
        trial = thresholds.copy()
        trial[j] = candidate
        trial_score = score(trial)
        if trial_score > best_score + 1e-12:
          best, best_score = candidate, trial_score
      changed |= best != thresholds[j]
      thresholds[j] = best
    if not changed:
      break
  return [float(t) for t in thresholds]


def weather_confusion(true_weather: np.ndarray, weather_probs: np.ndarray) -> list[list[int]]:
  """4x4 counts, rows the true weather, columns the predicted; rows with no true weather skipped."""
  true_weather = np.asarray(true_weather)
  matrix = np.zeros((schema.NUM_WEATHER, schema.NUM_WEATHER), dtype=int)
  known = true_weather.sum(axis=1) > 0
  np.add.at(matrix, (true_weather[known].argmax(axis=1),
                     np.asarray(weather_probs)[known].argmax(axis=1)), 1)
  return matrix.tolist()
