"""Faults the local server injects on purpose: latency, a seeded share of errors, refused images."""
import dataclasses
import random
import threading
import time
from typing import Callable

import grpc
import numpy as np

from model.serving.refusal import Refusal

__all__ = ['FaultInjector', 'Faults']


@dataclasses.dataclass
class Faults:
  """What to do to Predict calls on purpose.

  Attributes:
    latency_secs: added before every Predict answer.
    failure_fraction: the share of Predict calls answered `failure_code` instead (0 to 1),
      drawn from a generator seeded with `seed`, so a run is repeatable in arrival order.
    failure_code: UNAVAILABLE or RESOURCE_EXHAUSTED (any gRPC code is accepted).
    seed: the generator's seed.
    refuse_image: a predicate on one image (uint8 [H, W, 3]); a request holding an image for
      which it is true is answered INVALID_ARGUMENT, as a model that chokes on one input would.
    model_latency_secs: added to every model call (with batching, one per batch): a slow model,
      which keeps the batch threads busy so that the batch queue fills.
  """
  latency_secs: float = 0.0
  failure_fraction: float = 0.0
  failure_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
  seed: int = 0
  refuse_image: Callable[[np.ndarray], bool] | None = None
  model_latency_secs: float = 0.0


class FaultInjector:
  """Applies `Faults` to calls, thread-safely and deterministically for a seed.

  The Predict service calls `before_call` first and `check_images` on every input; a subclass
  may draw its own faults in `before_call` (under `self._lock`, from `self._random`).
  """

  def __init__(self, faults: Faults):
    self._lock = threading.Lock()
    self.set(faults)

  def set(self, faults: Faults) -> None:
    """Replaces the faults and restarts their generator from `faults.seed`."""
    with self._lock:
      self.faults = faults
      self._random = random.Random(faults.seed)

  def before_call(self) -> None:
    """Sleeps the latency, then raises a `Refusal` for the drawn share of calls."""
    faults = self.faults
    if faults.latency_secs > 0:
      time.sleep(faults.latency_secs)
    if faults.failure_fraction > 0:
      with self._lock:
        fail = self._random.random() < faults.failure_fraction
      if fail:
        raise Refusal(faults.failure_code, 'injected fault: the server is pretending to be '
                      f'{faults.failure_code.name.lower()}')

  def during_model_call(self) -> None:
    """Sleeps the model latency (on the thread that runs the model)."""
    if self.faults.model_latency_secs > 0:
      time.sleep(self.faults.model_latency_secs)

  def check_images(self, alias: str, array: np.ndarray) -> None:
    """Raises an INVALID_ARGUMENT `Refusal` when `refuse_image` is true of an image in `array`."""
    refuse = self.faults.refuse_image
    if refuse is None or array.ndim != 4:
      return
    for index, image in enumerate(array):
      if refuse(image):
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                      f'injected fault: input {alias} image {index} refused')
