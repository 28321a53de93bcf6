"""The training input: a preprocess output (manifest + TFRecord shards) as tf.data pipelines.

Usage:
  data = load_prepared('PREP_OUT', image_size=128)   # refuses a folder without a manifest
  verify_shards(data)                                 # names the file if a shard is corrupt
  (`python -m model.verify_data PREP_OUT` runs the same checks on every shard and lists each bad one)
  train = make_dataset(data, 'train', batch_size=32, training=True)   # endless: fit with
  model.fit(train, steps_per_epoch=steps_per_epoch(data, 'train', 32), ...)

Each element is `(images, targets, sample_weights)`: `uint8 [batch, H, W, 3]` pixels (the model
rescales them itself), `{'weather': [batch, 4], 'ground': [batch, 13]}` and per-output weights
that are 0 for the weather of a row that has no weather tag, so such a row adds no weather loss.
With `with_names=True` (evaluation), a fourth item: the image names, which `eval_half` splits.
"""
import concurrent.futures
import dataclasses
import hashlib
import math
import os
import zlib

import tensorflow as tf

from model import manifest as manifest_lib
from model import schema
from model.tf_example import feature_spec

__all__ = [
    'augment_batch', 'AUTOTUNE', 'check_shard', 'check_split_count', 'combine_summaries',
    'CorruptShard', 'DEFAULT_SHUFFLE_BUFFER', 'eval_half', 'find_corrupt_shard', 'load_prepared',
    'make_dataset', 'parse_batch', 'PreparedData', 'SPLITS', 'SplitSummary', 'steps_per_epoch',
    'verify_shards'
]

AUTOTUNE = tf.data.AUTOTUNE
SPLITS = schema.SPLITS

# Serialized records held for shuffling: 2048 chips at 128 px are about 100 MB, and the shard
# interleave already mixes files, so a larger buffer buys little randomness for its memory.
DEFAULT_SHUFFLE_BUFFER = 2048

# The manifest's compression names, as TFRecordDataset spells them.
_COMPRESSION = {'none': '', 'gzip': 'GZIP'}


class CorruptShard(ValueError):
  """A shard that cannot be read to its end: truncated, bit-flipped, or holding bad records."""


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """What the preprocess stage wrote, checked: where the shards are and what they should hold."""
  data_dir: str
  image_size: int
  compression_type: str                 # '' or 'GZIP', as tf.data.TFRecordDataset takes it
  shards: dict[str, tuple[str, ...]]    # split -> full shard paths
  counts: dict[str, int]                # split -> examples, as the manifest records them
  manifest: dict


@dataclasses.dataclass(frozen=True)
class SplitSummary:
  """What a full read of one split found: its example count and each label's count."""
  examples: int
  weather_counts: tuple[float, ...]
  ground_counts: tuple[float, ...]
  without_weather: int

  def label_frequencies(self) -> dict[str, float]:
    """Share of the examples that carry each label, in the schema's order."""
    counts = self.weather_counts + self.ground_counts
    return {label: (c / self.examples if self.examples else 0.0)
            for label, c in zip(schema.ALL_LABELS, counts)}


def _resolve(data_dir: str, path: str) -> str:
  """Shard paths in the manifest are relative to its folder; absolute or gs:// ones stay as given."""
  if '://' in path or os.path.isabs(path):
    return path
  return os.path.join(data_dir, path)


def load_prepared(data_dir: str, image_size: int | None = None,
                  require_shards: bool = True) -> PreparedData:
  """Reads and checks a preprocess output folder.

  Args:
    data_dir: the folder `beam_jobs.preprocess` wrote (local or gs://).
    image_size: the resolution the caller expects; None accepts the manifest's.
    require_shards: refuse a listed shard that does not exist; False leaves that to the caller
      (`model.verify_data` reports every missing shard beside the corrupt ones).

  Raises:
    ManifestMissing: the folder has no manifest.json (the stage did not finish).
    ValueError: a manifest from another stage, another image size, an unknown compression,
      a split with no shards or no examples.
    FileNotFoundError: a shard the manifest lists does not exist.
  """
  manifest = manifest_lib.read_manifest(data_dir, expected_stage='preprocess')
  where = manifest_lib.manifest_path(data_dir)
  size = int(manifest.get('image_size') or 0)
  if size <= 0:
    raise ValueError(f'{where} has no valid image_size ({manifest.get("image_size")!r})')
  if image_size is not None and int(image_size) != size:
    raise ValueError(
        f'{data_dir} holds {size}x{size} pixels but --image_size is {image_size}: run the '
        f'preprocess job with --image_size {image_size}, or drop --image_size to train at {size}')
  compression = str(manifest.get('compression', 'none')).lower()
  if compression not in _COMPRESSION:
    raise ValueError(f'{where}: unknown compression {compression!r} (expected one of '
                     f'{", ".join(_COMPRESSION)})')
  shards, counts = {}, {}
  examples = manifest.get('counts', {}).get('examples', {})
  for split in SPLITS:
    listed = manifest.get('shards', {}).get(split) or []
    if not listed:
      raise ValueError(f'{where} lists no {split} shards; training needs both '
                       f'{" and ".join(SPLITS)} splits')
    paths = tuple(_resolve(data_dir, p) for p in listed)
    missing = [p for p in paths if require_shards and not tf.io.gfile.exists(p)]
    if missing:
      raise FileNotFoundError(f'{where} lists {split} shards that do not exist: '
                              f'{", ".join(missing[:5])}' + (' ...' if len(missing) > 5 else ''))
    count = int(examples.get(split, 0))
    if count <= 0:
      raise ValueError(f'{where} records {count} {split} examples; training needs some')
    shards[split], counts[split] = paths, count
  return PreparedData(data_dir, size, _COMPRESSION[compression], shards, counts, manifest)


def eval_half(image_name: str) -> str:
  """Which half of the eval split an image is in: 'tuning' or 'test' (schema.EVAL_HALVES).

  model.train tunes the ground thresholds on the tuning half and scores them on the test half,
  so the F2 it calls honest comes from chips that never influenced a threshold. The first 8 bytes
  of sha256('eval-half:' + name), read as a fraction of 2**64, put the image in the tuning half
  when below 0.5. The prefix makes the rule independent of the preprocess job's train/eval hash
  (sha256 of the bare name), which would otherwise leave every eval name below 0.2. E.g.
  sha256('eval-half:train_100') starts 03924fd1842768ec = 0.0140: tuning;
  sha256('eval-half:train_0') starts 89e0af20458fa8e6 = 0.5386: test.
  """
  position = int.from_bytes(hashlib.sha256(f'eval-half:{image_name}'.encode('utf-8')).digest()[:8],
                            'big')
  return schema.EVAL_HALVES[0] if position < 2**63 else schema.EVAL_HALVES[1]


def parse_batch(serialized: tf.Tensor, image_size: int, with_names: bool = False):
  """Parses a batch of serialized tf.train.Examples into (images, targets, sample_weights), and
  the image names last when `with_names`.

  Fails (InvalidArgumentError) on a record whose pixels are not image_size x image_size x 3:
  a silent reshape of the wrong bytes would train on noise.
  """
  spec = feature_spec()
  if with_names:
    spec[schema.KEY_NAME] = feature_spec(with_identity=True)[schema.KEY_NAME]
  features = tf.io.parse_example(serialized, spec)
  expected = tf.constant([image_size, image_size, schema.CHANNELS], tf.int64)
  tf.debugging.assert_equal(
      features[schema.KEY_SHAPE], tf.broadcast_to(expected, tf.shape(features[schema.KEY_SHAPE])),
      message=f'a record is not {image_size}x{image_size}x{schema.CHANNELS} (the manifest size)')
  # decode_raw itself refuses a batch whose strings differ in length; the reshape refuses a
  # length that is not H*W*3.
  pixels = tf.io.decode_raw(features[schema.KEY_PIXELS], tf.uint8)
  images = tf.reshape(pixels, [-1, image_size, image_size, schema.CHANNELS])
  weather, ground = features[schema.KEY_WEATHER], features[schema.KEY_GROUND]
  targets = {schema.OUTPUT_WEATHER: weather, schema.OUTPUT_GROUND: ground}
  weights = {
      # A row without a weather tag (the real train_24448) must teach the weather head nothing.
      schema.OUTPUT_WEATHER: tf.cast(tf.reduce_sum(weather, axis=1) > 0, tf.float32),
      schema.OUTPUT_GROUND: tf.ones_like(ground[:, 0]),
  }
  if with_names:
    return images, targets, weights, features[schema.KEY_NAME]
  return images, targets, weights


# The 8 symmetries of a square as steps applied left to right: r flips the rows, c the columns,
# t transposes. Written so that 2 of 8 need the column flip and 4 of 8 the transpose (the two
# costly steps on 3-byte pixels), rather than half each: c-then-t, for instance, is r-then-t.
_SQUARE_SYMMETRIES = ('', 'r', 'c', 'rc', 't', 'rt', 'tr', 'rtr')


def _apply_steps(images: tf.Tensor, steps: str) -> tf.Tensor:
  for step in steps:
    if step == 'r':
      # Reversing the rows by a gather copies whole rows, which beats tf.reverse on this axis.
      images = tf.gather(images, tf.range(tf.shape(images)[1] - 1, -1, -1), axis=1)
    elif step == 'c':
      images = tf.reverse(images, axis=[2])
    else:
      images = tf.transpose(images, [0, 2, 1, 3])
  return images


def augment_batch(images: tf.Tensor) -> tf.Tensor:
  """Applies a random one of the 8 flips/90-degree rotations to each chip of a square batch.

  A satellite chip has no up or left, so every symmetry of the square is another valid chip. The
  batch is split by each chip's draw, each group gets its one symmetry, and the chips are stitched
  back in place: each chip is transformed once, by whole-tensor flips and transposes, where a
  pixel gather per batch or tf.where among 8 transformed copies of the batch does more per chip.
  """
  positions = tf.range(tf.shape(images)[0])
  choice = tf.random.uniform(tf.shape(positions), 0, len(_SQUARE_SYMMETRIES), tf.int32)
  groups = tf.dynamic_partition(images, choice, len(_SQUARE_SYMMETRIES))
  return tf.dynamic_stitch(
      tf.dynamic_partition(positions, choice, len(_SQUARE_SYMMETRIES)),
      [_apply_steps(group, steps) for group, steps in zip(groups, _SQUARE_SYMMETRIES)])


def steps_per_epoch(data: PreparedData, split: str, batch_size: int) -> int:
  return math.ceil(data.counts[split] / batch_size)


def make_dataset(data: PreparedData, split: str, batch_size: int, training: bool,
                 augment: bool = True, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 with_names: bool = False) -> tf.data.Dataset:
  """Builds the input pipeline of one split.

  Training: an endless stream (give Keras `steps_per_epoch`): shard order reshuffled on every
  pass, records interleaved from several shards at once, shuffled, batched, parsed, augmented
  (unless `augment=False`). Repeating before the shuffle keeps the pipeline full across epochs
  instead of draining and refilling the shuffle buffer at each one (a cost that weighs most on a
  small set), at the price of epoch boundaries that blur by up to a buffer of chips.
  Otherwise: one pass, the same interleave of the shards in manifest order every time, nothing
  shuffled or augmented, with the manifest's count as its length.

  Args:
    data: from `load_prepared`.
    split: 'train' or 'eval'.
    batch_size: examples per batch (a one-pass dataset's last batch may be smaller).
    training: repeat, shuffle and augment.
    augment: random flips and rotations (training only).
    shuffle_buffer: serialized records held for shuffling.
    with_names: each element ends with the batch's image names (one pass only, for evaluation).
  """
  if with_names and training:
    raise ValueError('with_names is for a one-pass (evaluation) dataset')
  files = tf.data.Dataset.from_tensor_slices(list(data.shards[split]))
  if training:
    files = files.shuffle(len(data.shards[split]), reshuffle_each_iteration=True).repeat()
  records = files.interleave(
      lambda path: tf.data.TFRecordDataset(path, compression_type=data.compression_type),
      cycle_length=min(len(data.shards[split]), 8), num_parallel_calls=AUTOTUNE,
      deterministic=not training)
  if training:
    records = records.shuffle(shuffle_buffer, reshuffle_each_iteration=True)
  # Batch serialized records first: one vectorised parse per batch instead of one per chip.
  batches = records.batch(batch_size).map(
      lambda serialized: parse_batch(serialized, data.image_size, with_names),
      num_parallel_calls=AUTOTUNE, deterministic=not training)
  if training and augment:
    batches = batches.map(lambda images, targets, weights: (augment_batch(images), targets, weights),
                          num_parallel_calls=AUTOTUNE, deterministic=False)
  if not training:
    # The manifest's count gives Keras a length (a real progress bar) and fails loudly if the
    # shards hold another number of records than the manifest says.
    batches = batches.apply(tf.data.experimental.assert_cardinality(
        steps_per_epoch(data, split, batch_size)))
  return batches.prefetch(AUTOTUNE)


def _check_gzip_complete(path: str, chunk_bytes: int = 1 << 20) -> None:
  """Raises CorruptShard unless a gzip shard ends with its trailer and its checksum matches.

  TensorFlow's gzip reader stops quietly where a truncated file ends if the cut falls between
  records, so a half-copied shard would just look shorter.
  """
  decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)   # gzip header and trailer
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      while not decompressor.eof and (chunk := f.read(chunk_bytes)):
        while chunk and not decompressor.eof:
          # Bounded output per call: the decompressed bytes are only counted, never kept.
          decompressor.decompress(chunk, chunk_bytes * 4)
          chunk = decompressor.unconsumed_tail
  except zlib.error as e:
    raise CorruptShard(f'shard {path} is not valid gzip ({e}); run the preprocess job again') from None
  if not decompressor.eof:
    raise CorruptShard(f'shard {path} ends before its gzip stream does: it is truncated; run the '
                       'preprocess job again (a half-copied shard is the usual cause)')


def check_shard(path: str, data: PreparedData) -> SplitSummary:
  """Reads one shard to its end through the training parser, or raises CorruptShard naming it.

  Every record's length and data CRCs are checked by the TFRecord reader, every record is parsed
  at the manifest's image size, and a gzip shard must end with its trailer.
  """
  records = tf.data.TFRecordDataset(path, compression_type=data.compression_type)
  parsed = records.batch(1024).map(lambda s: parse_batch(s, data.image_size))
  zero = (tf.constant(0, tf.int64), tf.zeros([schema.NUM_WEATHER]), tf.zeros([schema.NUM_GROUND]),
          tf.constant(0, tf.int64))

  def add(totals, batch):
    _, targets, weights = batch
    weather = targets[schema.OUTPUT_WEATHER]
    return (totals[0] + tf.shape(weather, out_type=tf.int64)[0],
            totals[1] + tf.reduce_sum(weather, axis=0),
            totals[2] + tf.reduce_sum(targets[schema.OUTPUT_GROUND], axis=0),
            totals[3] + tf.reduce_sum(tf.cast(weights[schema.OUTPUT_WEATHER] == 0, tf.int64)))

  try:
    examples, weather, ground, without = parsed.reduce(zero, add)
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
    message = getattr(e, 'message', str(e)).split('\n')[0]
    raise CorruptShard(
        f'shard {path} cannot be read to its end ({type(e).__name__}: {message}); it is truncated '
        'or corrupt: run the preprocess job again (a half-copied shard is the usual cause)') from None
  if data.compression_type == 'GZIP':
    _check_gzip_complete(path)
  return SplitSummary(int(examples), tuple(weather.numpy().tolist()),
                      tuple(ground.numpy().tolist()), int(without))


def combine_summaries(parts) -> SplitSummary:
  """One split's summary from its shards' summaries."""
  parts = list(parts)
  return SplitSummary(
      sum(p.examples for p in parts),
      tuple(map(sum, zip(*(p.weather_counts for p in parts)))),
      tuple(map(sum, zip(*(p.ground_counts for p in parts)))),
      sum(p.without_weather for p in parts))


def check_split_count(data: PreparedData, split: str, examples: int) -> None:
  """Raises ValueError when a split's shards hold another number of examples than the manifest."""
  if examples != data.counts[split]:
    raise ValueError(
        f'the {split} shards of {data.data_dir} hold {examples} examples but its '
        f'manifest records {data.counts[split]}: the folder was changed after the preprocess '
        'job wrote it; run that job again')


def verify_shards(data: PreparedData, splits=SPLITS, max_workers: int = 4) -> dict[str, SplitSummary]:
  """Reads every shard once, before training, so a bad one fails fast and by name.

  TensorFlow's own read error names a byte offset but not the file, and would surface mid-epoch.
  The same pass counts the labels (the prior-only baseline needs the train frequencies) and checks
  the example counts against the manifest.

  Returns:
    split -> SplitSummary.

  Raises:
    CorruptShard: a shard is truncated, corrupt, or holds records of another size; the message
      names the file.
    ValueError: a split holds another number of examples than the manifest records.
  """
  summaries = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
    for split in splits:
      # map() re-raises the first failure in shard order, so the message names that shard.
      summary = combine_summaries(pool.map(lambda p: check_shard(p, data), data.shards[split]))
      check_split_count(data, split, summary.examples)
      summaries[split] = summary
  return summaries


def find_corrupt_shard(data: PreparedData) -> CorruptShard | None:
  """After a read error mid-training, finds which shard it came from (None if all read now)."""
  try:
    verify_shards(data)
  except CorruptShard as e:
    return e
  return None
