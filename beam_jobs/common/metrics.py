"""Every counter name of both jobs, and the one namespace they are counted under.

As tfx-bsl's `_MetricsCollector` holds its RunInference counters: a DoFn names its counter by a
constant or a function here, never by a string at its call site, so the code, the tests and the
docs spell each counter one way, and this module is the list of what a job counts. The
preprocess job's tally (counts.json: `labels_train_clear`, `examples_eval`, ...) is counted
under `preprocess.rules.counter_name` of each tally key, beside these.

Usage:
  self._decoded = counter(IMAGES_DECODED)             # in a DoFn's setup()
  counter(dead_letters_of('NOT_AN_IMAGE')).inc()
  query_counters(result)[IMAGES_DECODED]              # after the pipeline ran
"""
import apache_beam as beam
from apache_beam.metrics import Metrics

__all__ = ['DEAD_LETTERS', 'IMAGES_DECODED', 'IMAGES_LISTED', 'IMAGES_REFUSED',
           'IMAGE_BYTES_READ', 'INFERENCE_BATCH_FALLBACKS', 'METRICS_NAMESPACE', 'PREDICTIONS',
           'SERVING_FAILED_IMAGES', 'SERVING_PREDICTED_IMAGES', 'SERVING_REQUESTS',
           'SERVING_REQUEST_BYTES', 'SERVING_RETRIES', 'SERVING_SINGLE_IMAGE_REQUESTS',
           'SERVING_THROTTLED_MS', 'SERVING_UNAVAILABLE_IMAGES', 'SUBMISSION_BUCKETS', 'counter',
           'dead_letters_of', 'distribution', 'images_of_kind', 'query_counters',
           'serving_metric', 'unusable_rows']

METRICS_NAMESPACE = 'planet'

# Both jobs.
DEAD_LETTERS = 'dead_letters'                  # every dead letter; by reason: dead_letters_of

# preprocess.
IMAGES_LISTED = 'images_listed'                # <images_dir>/*.jpg listed
IMAGE_BYTES_READ = 'image_bytes_read'          # bytes of the image files read

# predict.
IMAGES_DECODED = 'images_decoded'
IMAGES_REFUSED = 'images_refused'              # unreadable or undecodable: dead letters
PREDICTIONS = 'predictions'                    # rows predicted (not carried over or resumed)
INFERENCE_BATCH_FALLBACKS = 'inference_batch_fallbacks'   # batches predicted one by one
SUBMISSION_BUCKETS = 'submission_buckets'      # submission.csv's sorted parts
# predict through TF Serving: per transport ('grpc', 'rest'), as serving_metric(transport, ...).
SERVING_REQUESTS = 'requests'
SERVING_RETRIES = 'retries'
SERVING_SINGLE_IMAGE_REQUESTS = 'single_image_requests'   # a refused request's images, one by one
SERVING_PREDICTED_IMAGES = 'predicted_images'
SERVING_UNAVAILABLE_IMAGES = 'unavailable_images'
SERVING_FAILED_IMAGES = 'failed_images'
SERVING_REQUEST_BYTES = 'request_bytes'                   # a distribution
SERVING_THROTTLED_MS = 'throttled_ms'


def dead_letters_of(reason: str) -> str:
  """The counter of one reason's dead letters: dead_letters_<REASON>."""
  return f'{DEAD_LETTERS}_{reason}'


def images_of_kind(kind: str) -> str:
  """An incremental run's images of one kind (incremental.CARRIED, NEW, ...): images_<kind>."""
  return f'images_{kind}'


def unusable_rows(source: str) -> str:
  """Earlier rows of a source ('previous', 'completed') that are not rows: unusable_<source>_rows."""
  return f'unusable_{source}_rows'


def serving_metric(transport: str, what: str) -> str:
  """A TF Serving backend's metric: <transport>_<what> (grpc_requests, rest_retries, ...)."""
  return f'{transport}_{what}'


def counter(name: str):
  """A Beam counter in the project's namespace (cheap to call: Beam caches the cell)."""
  return Metrics.counter(METRICS_NAMESPACE, name)


def distribution(name: str):
  """A Beam distribution in the project's namespace."""
  return Metrics.distribution(METRICS_NAMESPACE, name)


def query_counters(result) -> dict[str, int]:
  """All the project's counters of a finished pipeline, by name (committed values)."""
  metrics = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(METRICS_NAMESPACE))
  totals: dict[str, int] = {}
  for item in metrics['counters']:
    totals[item.key.metric.name] = totals.get(item.key.metric.name, 0) + item.committed
  return totals
