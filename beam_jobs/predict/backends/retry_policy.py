"""How the TF Serving clients retry: transient codes, jittered backoff, a budget, throttling.

Both transports (gRPC and REST) report a failed call as a `CallFailed` with the gRPC status code
TF Serving meant (its REST API sends each code as an HTTP status: `model.serving.rest_protocol`),
so one policy serves both. A Predict call that fails with a transient code (UNAVAILABLE,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) is retried with jittered exponential backoff until
`retry_budget_secs` after its first failure, and every attempt first waits while the client-side
throttler (`AnsweredRequestsThrottler`: the SRE book's adaptive throttling, as Beam's, counting
each attempt when its answer comes) says the server is overloaded.

Usage:
  policy = RetryPolicy(timeout_secs=30, retry_budget_secs=30)
  answer = policy.call(lambda timeout: send(payload, timeout), request_bytes=len(payload),
                       throttler=handler.throttler, tally=CallTally(), address='tfserving:8500')
  # or GaveUp, or the CallFailed that is not transient
"""
import dataclasses
import random
import threading
import time
from typing import Any, Callable, Iterator

import grpc
from apache_beam.io.components.adaptive_throttler import ReactiveThrottler

__all__ = ['AnsweredRequestsThrottler', 'CallFailed', 'CallTally', 'GaveUp', 'RetryPolicy',
           'TRANSIENT_CODES', 'backoff_delays', 'is_transient', 'may_be_one_image']

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             grpc.StatusCode.DEADLINE_EXCEEDED})
# Beam's throttler keeps plain lists; the requests of a batch run on several threads.
_THROTTLE_LOCK = threading.Lock()


class AnsweredRequestsThrottler(ReactiveThrottler):
  """Beam's adaptive throttling (P = (requests - K * accepts) / (requests + 1) over a window),
  with each attempt counted when its answer comes rather than when it leaves.

  Beam's AdaptiveThrottler adds an attempt in `throttle_request` and its success in
  `successful_request`. With several requests in flight, those not yet answered count as
  attempts without success, so on a healthy server the 2nd to 4th request of each 1-second
  window were throttled (P = 1/2 to 3/4) and slept `throttle_delay_secs`: 11 of 128 requests and
  14 s asleep in a 16.9 s run of 4,096 images. Here `throttle_request` only asks, and `answered`
  records an attempt with its outcome: a transient failure counts against the server, any other
  answer (a result, or a refusal of the input) for it. Beam's own `successful_request` around a
  whole RunInference batch records nothing: its requests were counted one by one.
  """

  def throttle_request(self, now):
    with _THROTTLE_LOCK:
      probability = self._throttling_probability(now)
    return self._random.uniform(0, 1) < probability

  def successful_request(self, now):
    del now   # the batch's requests were each counted by `answered`

  def answered(self, now: float, accepted: bool) -> None:
    """One attempt's outcome at `now` (ms since the epoch); accepted = not a transient failure."""
    with _THROTTLE_LOCK:
      self._all_requests.add(now, 1)
      if accepted:
        self._successful_requests.add(now, 1)


def is_transient(code: grpc.StatusCode, details: str = '') -> bool:
  """Worth retrying: the server may answer later. An over-size refusal never will."""
  if code == grpc.StatusCode.RESOURCE_EXHAUSTED and 'larger than max' in (details or ''):
    return False
  return code in TRANSIENT_CODES


def may_be_one_image(code: grpc.StatusCode) -> bool:
  """Whether a refused request is worth re-sending image by image: the fault may lie in one input.

  NOT_FOUND, FAILED_PRECONDITION, PERMISSION_DENIED and the like concern the model or the caller,
  and would only be repeated once per image.
  """
  return code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL,
                  grpc.StatusCode.UNKNOWN, grpc.StatusCode.OUT_OF_RANGE,
                  grpc.StatusCode.RESOURCE_EXHAUSTED)


def backoff_delays(initial_secs: float, max_secs: float, rng: random.Random) -> Iterator[float]:
  """Endless exponential delays (x2, capped), each jittered down by up to half so workers spread out."""
  delay = initial_secs
  while True:
    yield delay * rng.uniform(0.5, 1.0)
    delay = min(max_secs, delay * 2)


class CallFailed(Exception):
  """A call to the server that failed, in either API, as the gRPC status code TF Serving meant.

  Attributes:
    code: the `grpc.StatusCode` (a REST answer's HTTP status read back, or a connection failure).
    details: the server's message, or what went wrong on the way.
    answered: False when no server answered at all (nothing listens, no answer in time), which
      the start-up check reports as a missing server rather than a refusal.
  """

  def __init__(self, code: grpc.StatusCode, details: str, *, answered: bool = True):
    super().__init__(details)
    self.code = code
    self.details = details
    self.answered = answered


class GaveUp(Exception):
  """Transient failures outlasted the retry budget."""


@dataclasses.dataclass
class CallTally:
  """What the calls for one batch did; counted on the bundle's thread (Beam metrics are per thread)."""
  requests: int = 0
  retries: int = 0
  single_image_requests: int = 0
  throttled_secs: float = 0.0
  request_bytes: list[int] = dataclasses.field(default_factory=list)

  def add(self, other: 'CallTally') -> None:
    self.requests += other.requests
    self.retries += other.retries
    self.single_image_requests += other.single_image_requests
    self.throttled_secs += other.throttled_secs
    self.request_bytes.extend(other.request_bytes)


def _wait_while_throttled(throttler, give_up_at: float | None) -> tuple[float, bool]:
  """Beam's throttle(), with the sleep counted and bounded by `give_up_at`.

  Returns (seconds waited, whether `give_up_at` (monotonic) passed while still throttled).
  """
  waited = 0.0
  while True:
    throttled = throttler.throttle_request(time.time() * 1000)
    if not throttled:
      return waited, False
    if give_up_at is not None and time.monotonic() >= give_up_at:
      return waited, True
    time.sleep(throttler.throttle_delay_secs)
    waited += throttler.throttle_delay_secs


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """The deadline of each call and how long, and how often, a transient failure is retried.

  Attributes:
    timeout_secs: the deadline of every call.
    retry_budget_secs: how long after its first transient failure a request is retried.
    initial_backoff_secs, max_backoff_secs: the backoff between retries (doubling, jittered).
  """
  timeout_secs: float = 30.0
  retry_budget_secs: float = 30.0
  initial_backoff_secs: float = 0.25
  max_backoff_secs: float = 4.0

  def call(self, send: Callable[[float], Any], *, request_bytes: int, throttler,
           tally: CallTally, address: str) -> Any:
    """`send(timeout_secs)`, retried on transient failures until the budget runs out.

    Args:
      send: one attempt, given the deadline; raises `CallFailed` when the call fails.
      request_bytes: the size of what one attempt sends, added to `tally` per attempt.
      throttler: the handler's `AnsweredRequestsThrottler`, told of every answer.
      tally: counts attempts, retries, time throttled and bytes sent.
      address: the server, for messages.

    Raises:
      GaveUp: transient failures (then throttling) outlasted `retry_budget_secs`.
      CallFailed: a failure that is not transient, at once.
    """
    delays = backoff_delays(self.initial_backoff_secs, self.max_backoff_secs, random.Random())
    first_failure_at = None
    last_failure: CallFailed | None = None
    attempts = 0
    while True:
      # The budget runs from the first failure: before one, a throttled client only waits.
      give_up_at = None if first_failure_at is None else first_failure_at + self.retry_budget_secs
      waited, throttled = _wait_while_throttled(throttler, give_up_at)
      tally.throttled_secs += waited
      if throttled:
        raise GaveUp(self._gave_up_message(address, last_failure, attempts, first_failure_at,
                                           'then throttled client-side'))
      attempts += 1
      tally.requests += 1
      tally.request_bytes.append(request_bytes)
      try:
        answer = send(self.timeout_secs)
      except CallFailed as failure:
        transient = is_transient(failure.code, failure.details)
        throttler.answered(time.time() * 1000, accepted=not transient)
        if not transient:
          raise
        last_failure = failure
        now = time.monotonic()
        if first_failure_at is None:
          first_failure_at = now
        delay = next(delays)
        if now + delay - first_failure_at > self.retry_budget_secs:
          raise GaveUp(self._gave_up_message(address, failure, attempts,
                                             first_failure_at)) from None
        tally.retries += 1
        time.sleep(delay)
        continue
      throttler.answered(time.time() * 1000, accepted=True)
      return answer

  def _gave_up_message(self, address: str, failure: CallFailed, attempts: int,
                       first_failure_at: float, note: str = '') -> str:
    return (f'{address}: {failure.code.name} after {attempts} attempt(s) over '
            f'{time.monotonic() - first_failure_at:.1f}s{", " + note if note else ""} (retry '
            f'budget {self.retry_budget_secs:g}s): {failure.details}')
