"""Metrics: Kaggle's F2 on worked examples, thresholds that really maximise it."""
import numpy as np
import pytest

from model import metrics, schema


def test_f2_worked_examples():
  y_true = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
  y_pred = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
  # Row 1: tp=1 fn=1 fp=0 -> 5/(5+4) ; row 2: tp=1 fp=3 -> 5/(5+3); row 3: 0 by convention; row 4: 1.
  expected = [5 / 9, 5 / 8, 0.0, 1.0]
  np.testing.assert_allclose(metrics.f2_per_image(y_true, y_pred), expected)
  assert metrics.mean_f2(y_true, y_pred) == pytest.approx(np.mean(expected), abs=1e-12)


def test_per_label_scores():
  y_true = np.array([[1, 0], [1, 1], [0, 1]])
  y_pred = np.array([[1, 1], [0, 1], [0, 1]])
  scores = metrics.per_label_scores(y_true, y_pred, labels=('a', 'b'))
  assert scores['a'] == {'precision': 1.0, 'recall': 0.5, 'f2': pytest.approx(5 / 9),
                         'support': 2, 'predicted': 1}
  assert scores['b']['precision'] == pytest.approx(2 / 3) and scores['b']['recall'] == 1.0


def test_decide_takes_weather_argmax_and_ground_thresholds():
  weather = np.array([[0.6, 0.1, 0.2, 0.1]])
  ground = np.full((1, schema.NUM_GROUND), 0.3)
  ground[0, 8] = 0.9
  thresholds = [0.5] * schema.NUM_GROUND
  decisions = metrics.decide(weather, ground, thresholds)
  assert metrics.tags_of(decisions[0]) == ['clear', 'primary']


def test_the_label_rule_leaves_a_cloudy_chip_without_ground_tags():
  weather = np.array([[0.1, 0.6, 0.2, 0.1], [0.1, 0.3, 0.2, 0.4]])
  ground = np.full((2, schema.NUM_GROUND), 0.3)
  ground[:, 8] = 0.9
  thresholds = [0.5] * schema.NUM_GROUND
  ruled = metrics.decide(weather, ground, thresholds)   # the default: cloudy_no_ground
  assert [metrics.tags_of(row) for row in ruled] == [['cloudy'], ['partly_cloudy', 'primary']]
  plain = metrics.decide(weather, ground, thresholds, schema.LABEL_RULE_NONE)
  assert [metrics.tags_of(row) for row in plain] == [['cloudy', 'primary'],
                                                    ['partly_cloudy', 'primary']]
  with pytest.raises(ValueError, match='unknown label rule'):
    metrics.decide(weather, ground, thresholds, 'cloudy')


def test_best_thresholds_beat_the_default():
  rng = np.random.default_rng(0)
  n = 400
  y_true = np.zeros((n, 17), dtype=int)
  y_true[np.arange(n), rng.integers(0, 4, n)] = 1
  y_true[:, 4:] = rng.random((n, 13)) < 0.3
  weather_probs = y_true[:, :4] * 0.7 + 0.1
  # Ground scores: positives around 0.55, negatives around 0.45: the default 0.2 over-predicts.
  ground_probs = np.clip(0.45 + 0.1 * y_true[:, 4:] + rng.normal(0, 0.05, (n, 13)), 0, 1)
  default = metrics.mean_f2(y_true, metrics.decide(weather_probs, ground_probs, [0.2] * 13))
  thresholds = metrics.best_ground_thresholds(y_true, weather_probs, ground_probs)
  tuned = metrics.mean_f2(y_true, metrics.decide(weather_probs, ground_probs, thresholds))
  assert tuned > default + 0.05
  assert all(0.3 < t < 0.6 for t in thresholds)


def test_weather_confusion():
  true_weather = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
  probs = np.array([[0.9, 0.1, 0, 0], [0.1, 0.9, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]])
  matrix = metrics.weather_confusion(true_weather, probs)
  assert matrix[0][0] == 1 and matrix[0][1] == 1 and matrix[3][3] == 1
  assert sum(map(sum, matrix)) == 3
