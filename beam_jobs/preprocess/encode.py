"""The preprocess job's hot path, fused: read, hash, decode, serialise and write each image.

One DoFn does all of it, so an Example's bytes never cross a grouping or a process: each bundle
decodes its images on a thread pool (reading, sha256 and Pillow's decoding release the GIL, so
the threads use every core of the worker) and writes each Example, in input order, straight into
the bundle's part file of its split's shard (beam_jobs/common/tfrecord_sink.py). What leaves the
DoFn is small: the part names, dead letters, and the bundle's tally as (key, count) pairs.
"""
import collections
import concurrent.futures
import os
from typing import Iterator

import apache_beam as beam
from apache_beam.transforms.display import DisplayDataItem
from apache_beam.transforms.window import GlobalWindows

from beam_jobs.common.image_files import read_image_file
from beam_jobs.common.progress import count_progress, counter, tally_folder_exists
from beam_jobs.common.tfrecord_sink import ShardPartWriter, shard_pattern
from beam_jobs.preprocess.config import PreprocessConfig
from beam_jobs.preprocess.rules import (EncodedExample, LabelledImage, assign_split,
                                        example_shard, image_to_example, row_dead_letter,
                                        tally_example)
from model.errors import InputRefused

__all__ = ['EncodeAndWriteExamples', 'encode_labelled_image']

# Images go to the threads in chunks, so that the pool's own per-task cost (a future, a lock, a
# queue hand-off: tens of microseconds, under the GIL) is paid once per chunk, not per image.
_CHUNK_IMAGES = 16
# Chunks in flight per thread: enough that no thread waits for the writer, few enough that the
# bundle's memory stays a few MB (an Example is ~50 KB at 128 px).
_IN_FLIGHT_PER_THREAD = 2


def encode_labelled_image(image: LabelledImage, config: PreprocessConfig
                          ) -> tuple[EncodedExample | None, dict | None, int]:
  """One image: its file read (bounded), hashed, decoded and serialised, and its split.

  Returns:
    (EncodedExample, None, bytes read), or (None, the row's dead letter, bytes read) when the
    file cannot be read or decoded.
  """
  try:
    data = read_image_file(image.path, config.max_file_bytes)
  except InputRefused as refusal:   # not a regular file, too large, gone, unreadable
    return None, _dead_letter(image, refusal), 0
  try:
    serialized = image_to_example(image.row, data, config.image_size, config.max_pixels)
  except InputRefused as refusal:
    return None, _dead_letter(image, refusal), len(data)
  split = assign_split(image.image_name, config.eval_fraction)
  return EncodedExample(split, image.row, serialized), None, len(data)


def _encode_chunk(images: list[LabelledImage], config: PreprocessConfig) -> list[tuple]:
  return [encode_labelled_image(image, config) for image in images]


def _dead_letter(image: LabelledImage, refusal: InputRefused) -> dict:
  return row_dead_letter(image.image_name, refusal.reason, refusal.message, 'decode_image',
                         image.line, image.path)


class EncodeAndWriteExamples(beam.DoFn):
  """A list of LabelledImages (a join bucket's) -> their Examples, each written into this
  bundle's part of its split's shard.

  Outputs: main, at the end of a bundle: (split, (shard, part path)) for each part it wrote;
  'refused': dead letters; 'tally': (tally key, count) pairs, at the end of a bundle. Examples
  are written in the order their images arrived, whatever the order the threads finish in.
  """
  REFUSED = 'refused'
  TALLY = 'tally'

  def __init__(self, config: PreprocessConfig, parts_dirs: dict[str, str],
               progress_folder: str | None = None, threads: int | None = None):
    self._config = config
    self._parts_dirs = parts_dirs
    self._progress_folder = progress_folder
    self._threads = threads
    self._pool = None

  def display_data(self):
    shards = dict(self._config.num_shards)
    return {**{f'{split}_file_pattern': DisplayDataItem(
                   shard_pattern(self._config.shard_prefix(split), self._config.compression),
                   label='File Pattern') for split in shards},
            **{f'{split}_shards': DisplayDataItem(n, label='Number of Shards')
               for split, n in shards.items()}}

  def setup(self):
    threads = self._threads or os.cpu_count() or 1
    self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix='encode')
    self._window = threads * _IN_FLIGHT_PER_THREAD
    self._shards = dict(self._config.num_shards)
    self._count_progress = tally_folder_exists(self._progress_folder)
    self._bytes_read = counter('image_bytes_read')

  def start_bundle(self):
    self._chunk = []
    self._pending = collections.deque()
    self._writers = {split: ShardPartWriter(folder, self._config.compression)
                     for split, folder in self._parts_dirs.items()}
    self._tally = collections.Counter()

  def process(self, images: list[LabelledImage]) -> Iterator:
    for image in images:
      self._chunk.append(image)
      if len(self._chunk) < _CHUNK_IMAGES:
        continue
      self._pending.append(self._pool.submit(_encode_chunk, self._chunk, self._config))
      self._chunk = []
      while self._pending and (len(self._pending) > self._window or self._pending[0].done()):
        for outcome in self._pending.popleft().result():
          letter = self._settle(outcome)
          if letter is not None:
            yield beam.pvalue.TaggedOutput(self.REFUSED, letter)

  def _settle(self, outcome: tuple[EncodedExample | None, dict | None, int]) -> dict | None:
    """Writes a good image's Example and counts it; returns a bad one's dead letter."""
    example, letter, bytes_read = outcome
    self._bytes_read.inc(bytes_read)
    if example is None:
      return letter
    self._writers[example.split].write(
        example_shard(example.row.image_name, self._shards[example.split]), example.serialized)
    self._tally.update(tally_example(example))
    if self._count_progress:
      count_progress(self._progress_folder, 1)
    return None

  def finish_bundle(self) -> Iterator:
    if self._chunk:
      self._pending.append(self._pool.submit(_encode_chunk, self._chunk, self._config))
      self._chunk = []
    while self._pending:
      for outcome in self._pending.popleft().result():
        letter = self._settle(outcome)
        if letter is not None:
          yield beam.pvalue.TaggedOutput(self.REFUSED, GlobalWindows.windowed_value(letter))
    for split, writer in self._writers.items():
      for shard_and_path in writer.close():
        yield GlobalWindows.windowed_value((split, shard_and_path))
    for key_and_count in sorted(self._tally.items()):
      yield beam.pvalue.TaggedOutput(self.TALLY, GlobalWindows.windowed_value(key_and_count))
    if self._count_progress:
      count_progress(self._progress_folder, 0, write_now=True)

  def teardown(self):
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
