"""The preprocess job's hot path, fused: read, hash, decode, serialise and write each image.

One DoFn does all of it, so an Example's bytes never cross a grouping or a process: each bundle
decodes its images ahead on a thread pool (common/lookahead.py: reading, sha256 and Pillow's
decoding release the GIL, so the threads use every core of the worker) and writes each Example,
in input order, straight into the bundle's part file of its split's shard
(beam_jobs/common/tfrecord_sink.py). What leaves the DoFn is small: the part names, dead
letters, and the bundle's tally as (key, count) pairs.

Usage:
  encoded = images | beam.ParDo(EncodeAndWriteExamples(config, parts_dirs)).with_outputs(
      EncodeAndWriteExamples.REFUSED, EncodeAndWriteExamples.TALLY, main='parts')
"""
import collections
import io
import os
import uuid
from typing import Iterator, NamedTuple

import apache_beam as beam
from apache_beam.transforms.display import DisplayDataItem
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils import shared

from beam_jobs.common.image_files import read_image_file
from beam_jobs.common.lookahead import Lookahead, stop, thread_pool
from beam_jobs.common.metrics import IMAGE_BYTES_READ, counter
from beam_jobs.common.progress import ProgressCounter
from beam_jobs.common.tfrecord_sink import (ShardPartWriter, append_part, part_path,
                                            shard_pattern, write_record)
from beam_jobs.preprocess import encoder_processes
from beam_jobs.preprocess.config import PreprocessConfig
from beam_jobs.preprocess.rules import (EncodedExample, LabelledImage, assign_split,
                                        example_shard, image_to_example, row_dead_letter,
                                        tally_example)
from model.errors import InputRefused

__all__ = ['EncodeAndWriteExamples', 'EncodedBatch', 'encode_and_append', 'encode_labelled_image']

# Images go to the threads in chunks, so that the pool's own per-task cost (a future, a lock, a
# queue hand-off: tens of microseconds, under the GIL) is paid once per chunk, not per image.
_CHUNK_IMAGES = 16
# A task of an encoder process: larger, since each also pays for pickling and for appending to
# the process's part files.
_CHUNK_IMAGES_PER_PROCESS_TASK = 64
# Chunks in flight per thread (or per encoder process): enough that no thread waits for the
# writer, few enough that the bundle's memory stays a few MB (an Example is ~50 KB at 128 px).
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


class EncodedBatch(NamedTuple):
  """What an encoder process sends back for a batch: no Example, only what the DoFn reports."""
  letters: list[dict]                          # dead letters, in input order
  tally: collections.Counter                   # tally keys of the Examples written
  written: int                                 # Examples written
  bytes_read: int
  parts: list[tuple[str, tuple[int, str]]]     # (split, (shard, part path)) appended to


def encode_and_append(images: list[LabelledImage], config: PreprocessConfig,
                      parts_dirs: dict[str, str], bundle: str) -> EncodedBatch:
  """In an encoder process (encoder_processes.py): encodes `images` and appends each Example to
  this process's part of its shard for `bundle`, in input order; the tally is counted here, so
  the DoFn's work per image is nil."""
  shards = dict(config.num_shards)
  framed: dict[tuple[str, int], io.BytesIO] = {}
  letters, tally, bytes_read = [], collections.Counter(), 0
  for image in images:
    example, letter, size = encode_labelled_image(image, config)
    bytes_read += size
    if example is None:
      letters.append(letter)
      continue
    shard = example_shard(image.image_name, shards[example.split])
    write_record(framed.setdefault((example.split, shard), io.BytesIO()), example.serialized)
    tally.update(tally_example(example))
  parts = []
  for (split, shard), framing in framed.items():
    path = part_path(parts_dirs[split], shard, f'{bundle}-{os.getpid()}', config.compression)
    os.makedirs(parts_dirs[split], exist_ok=True)
    append_part(path, framing.getvalue(), config.compression)
    parts.append((split, (shard, path)))
  return EncodedBatch(letters, tally, len(images) - len(letters), bytes_read, parts)


class EncodeAndWriteExamples(beam.DoFn):
  """A list of LabelledImages (a join bucket's) -> their Examples, each written into this
  bundle's part of its split's shard.

  Outputs: main, at the end of a bundle: (split, (shard, part path)) for each part written;
  'refused': dead letters; 'tally': (tally key, count) pairs, at the end of a bundle.

  With `config.encoder_processes` (a local run, encoder_processes.py), batches of images go to
  that many processes of this worker and each writes its own parts: an image whose shard is
  owned by one process (all shards but the last `count % processes` of a split) goes to that
  process, so the shard is one part, published by a rename; the others go to the processes in
  turn. Without, a thread pool decodes and this DoFn writes each Example, in the order the images
  arrived, into the bundle's parts.
  """
  REFUSED = 'refused'
  TALLY = 'tally'

  def __init__(self, config: PreprocessConfig, parts_dirs: dict[str, str],
               progress_folder: str | None = None, threads: int | None = None):
    self._config = config
    self._parts_dirs = parts_dirs
    self._progress = ProgressCounter(progress_folder)
    self._threads = threads
    self._shared_processes = shared.Shared()
    self._processes = None
    self._executors = ()
    self._pool_is_processes = False

  def display_data(self):
    shards = dict(self._config.num_shards)
    return {**{f'{split}_file_pattern': DisplayDataItem(
                   shard_pattern(self._config.shard_prefix(split), self._config.compression),
                   label='File Pattern') for split in shards},
            **{f'{split}_shards': DisplayDataItem(n, label='Number of Shards')
               for split, n in shards.items()}}

  def setup(self):
    self._shards = dict(self._config.num_shards)
    if self._config.encoder_processes:
      self._processes = encoder_processes.acquire(self._shared_processes,
                                                  self._config.encoder_processes)
      self._executors, self._pool_is_processes = self._processes.executors, True
      self._chunk_images, self._window = _CHUNK_IMAGES_PER_PROCESS_TASK, _IN_FLIGHT_PER_THREAD
      workers = len(self._executors)
      # Shards below this are each owned by one process; the rest are shared in turn.
      self._owned_shards = {split: count - count % workers
                            for split, count in self._shards.items()}
    else:
      workers = self._threads or os.cpu_count() or 1
      self._executors = (thread_pool(workers, 'encode'),)
      self._pool_is_processes, self._chunk_images = False, _CHUNK_IMAGES
      self._owned_shards = {split: 0 for split in self._shards}
      self._window = workers * _IN_FLIGHT_PER_THREAD
    self._bytes_read = counter(IMAGE_BYTES_READ)

  def start_bundle(self):
    # Per lane (the thread pool, or each encoder process): the batch being filled, and the
    # batches in flight, at most `_window`: a lane waits for its own oldest batch only, so one
    # busy process never keeps another waiting for work.
    self._chunks = [[] for _ in self._executors]
    self._lanes = [Lookahead(executor, self._window) for executor in self._executors]
    self._next_lane = 0
    self._writers = {split: ShardPartWriter(folder, self._config.compression)
                     for split, folder in self._parts_dirs.items()}
    self._bundle = uuid.uuid4().hex
    self._appended = set()   # (split, (shard, part path)) that encoder processes appended to
    self._tally = collections.Counter()

  def _lane_of(self, image: LabelledImage) -> int:
    if len(self._executors) == 1:
      return 0
    split = assign_split(image.image_name, self._config.eval_fraction)
    if not self._owned_shards[split]:   # a split whose every shard the processes share
      return self._next_lane
    shard = example_shard(image.image_name, self._shards[split])
    return shard % len(self._executors) if shard < self._owned_shards[split] else self._next_lane

  def _submit(self, lane: int) -> None:
    chunk, self._chunks[lane] = self._chunks[lane], []
    self._next_lane = (lane + 1) % len(self._executors)
    if self._pool_is_processes:
      self._lanes[lane].submit(encode_and_append, chunk, self._config, self._parts_dirs,
                               self._bundle)
    else:
      self._lanes[lane].submit(_encode_chunk, chunk, self._config)

  def _settle_batch(self, result) -> Iterator[dict]:
    """Writes or counts the images of a lane's batch; yields their dead letters."""
    if self._pool_is_processes:   # written and tallied by the encoder process
      self._appended.update(result.parts)
      self._tally.update(result.tally)
      self._bytes_read.inc(result.bytes_read)
      if result.written:
        self._progress.add(result.written)
      yield from result.letters
      return
    for outcome in result:
      letter = self._settle(outcome)
      if letter is not None:
        yield letter

  def process(self, images: list[LabelledImage]) -> Iterator:
    for image in images:
      lane = self._lane_of(image)
      self._chunks[lane].append(image)
      if len(self._chunks[lane]) < self._chunk_images:
        continue
      self._submit(lane)
      for ahead in self._lanes:
        for result in ahead.ready():
          for letter in self._settle_batch(result):
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
    self._progress.add(1)
    return None

  def finish_bundle(self) -> Iterator:
    for lane, chunk in enumerate(self._chunks):
      if chunk:
        self._submit(lane)
    for ahead in self._lanes:
      for result in ahead.drain():
        for letter in self._settle_batch(result):
          yield beam.pvalue.TaggedOutput(self.REFUSED, GlobalWindows.windowed_value(letter))
    for split, writer in self._writers.items():
      for shard_and_path in writer.close():
        yield GlobalWindows.windowed_value((split, shard_and_path))
    for split_and_part in sorted(self._appended):
      yield GlobalWindows.windowed_value(split_and_part)
    for key_and_count in sorted(self._tally.items()):
      yield beam.pvalue.TaggedOutput(self.TALLY, GlobalWindows.windowed_value(key_and_count))
    self._progress.write_now()

  def teardown(self):
    if self._executors and not self._pool_is_processes:
      stop(self._executors[0])
    # The processes are this worker's (Shared): they end once no instance holds them.
    self._processes, self._executors = None, ()
