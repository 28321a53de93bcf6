"""The incremental prediction join: each image name with its file's sha256 and its earlier rows.

The images listed now, keyed by name with their path and fingerprint, meet the earlier rows
(--previous_output's predictions files and the part files --resume keeps, read in parallel
ranges) in a CoGroupByKey by image name: each name is decided on its own (`incremental.decide`),
so no worker ever holds all earlier rows. Hashing reads each file once with the same bounded,
regular-files-only read as decoding; the images left to predict then take the usual path.

Usage:
  carry = unique_images | 'CarryOver' >> CarryOver(config)
  carry['to_predict']   # (name, path): to read, decode and predict as usual
  carry['reused']       # the rows carried over or resumed, ready for the outputs
  carry['removed']      # {'image_name', 'path'}: --previous_output's images gone from the inputs
  carry['kinds']        # {kind: count}, one element: the summary's `incremental` counts
"""
import collections
from typing import Iterable

import apache_beam as beam
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.transforms.window import GlobalWindows

from beam_jobs.common.image_decoder import decode_image
from beam_jobs.common.image_files import read_image_file
from beam_jobs.common.progress import counter
from beam_jobs.predict.config import JobConfig
from beam_jobs.predict.incremental import (CARRIED, REMOVED, RESUMED, decide, fingerprint,
                                           parse_known_row, row_inference)
from model.errors import InputRefused

__all__ = ['CarryOver', 'Decide', 'add_counts', 'fingerprint_file', 'keyed_known_row',
           'thumbnail_items']


def fingerprint_file(element, max_file_bytes: int):
  """(name, path) -> (name, (path, sha256 of its bytes)); sha256 None when it cannot be read
  (the image is then predicted, and dead-lettered with its reason by the decoding step)."""
  name, path = element
  try:
    return name, (path, fingerprint(read_image_file(path, max_file_bytes)))
  except InputRefused:
    return name, (path, None)


def keyed_known_row(line: str, source: str):
  """An earlier row's line -> (image name, row); a line that is not a row is counted, unused."""
  row = parse_known_row(line)
  if row is None:
    counter(f'unusable_{source}_rows').inc()
    return
  yield row['image_name'], row


def add_counts(counts: Iterable[dict]) -> dict:
  """{kind: count} dicts added up."""
  total = collections.Counter()
  for count in counts:
    total.update(count)
  return dict(total)


class Decide(beam.DoFn):
  """(name, {'current', 'previous', 'completed'}) -> (name, path) to predict on the main output,
  or a reused row ('reused'), or a removed image ('removed'); {kind: count} of each bundle on
  'kinds' (one element per bundle, not one per image: the carried path is the cheap one)."""

  def __init__(self, plan, thresholds):
    self._plan = plan
    self._thresholds = thresholds
    self._kinds = collections.Counter()

  def start_bundle(self):
    self._kinds = collections.Counter()

  def process(self, element):
    name, known = element
    decision = decide(name, list(known['current']), list(known['previous']),
                      list(known['completed']), self._plan, self._thresholds)
    if decision is None:
      return
    kind, value = decision
    counter(f'images_{kind}').inc()
    self._kinds[kind] += 1
    if kind in (CARRIED, RESUMED):
      yield beam.pvalue.TaggedOutput('reused', value)
    elif kind == REMOVED:
      yield beam.pvalue.TaggedOutput('removed', value)
    else:
      yield value

  def finish_bundle(self):
    if self._kinds:
      yield beam.pvalue.TaggedOutput('kinds', GlobalWindows.windowed_value(dict(self._kinds)))


@beam.ptransform_fn
def CarryOver(images, config: JobConfig):  # pylint: disable=invalid-name
  """(name, path) of the unique images -> a dict of PCollections (see the module's usage)."""
  plan = config.carry

  def earlier_rows(source: str, files: tuple[str, ...]):
    label = source.capitalize()
    return (images.pipeline
            | f'{label}RowFiles' >> beam.Create(files)
            | f'Read{label}Rows' >> beam.io.ReadAllFromText()
            | f'Parse{label}Rows' >> beam.FlatMap(keyed_known_row, source))

  decided = ({'current': images | 'Fingerprint' >> beam.Map(fingerprint_file,
                                                             config.max_file_bytes),
              'previous': earlier_rows('previous', plan.previous_files),
              'completed': earlier_rows('completed', plan.completed_files)}
             | 'JoinByName' >> beam.CoGroupByKey()
             | 'Decide' >> beam.ParDo(Decide(plan, config.thresholds)).with_outputs(
                 'reused', 'removed', 'kinds', main='to_predict'))
  kinds = decided.kinds | 'KindCounts' >> beam.CombineGlobally(add_counts)
  return {'to_predict': decided.to_predict, 'reused': decided.reused,
          'removed': decided.removed, 'kinds': kinds}


def thumbnail_items(sample, image_size: int, max_pixels: int, max_file_bytes: int) -> list:
  """The report's sample as `thumbnails.make_thumbnails` takes it: ((name, path), result).

  `sample` holds ((name, path, sha256), PredictionResult) for images inferred in this run and
  ((name, path, sha256), row) for reused rows; the image of a reused row is read and decoded
  here (at most MAX_THUMBNAILS of them), and left out if it cannot be any more.
  """
  items = []
  for (name, path, _), value in sample:
    if isinstance(value, dict):
      try:
        pixels = decode_image(read_image_file(path, max_file_bytes), image_size, max_pixels)
      except InputRefused:
        continue
      value = PredictionResult(pixels, row_inference(value))
    items.append(((name, path), value))
  return items
