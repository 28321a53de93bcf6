"""Items gathered by bucket into lists before a grouping, and the bucket of an image name.

Every join and ordered write of both jobs groups by bucket, not by element: Beam's per-element
cost through a shuffle is then paid once per list of a bucket's items. `name_bucket` is the one
hash of a name both jobs bucket by; `BucketBatcher` is the one batcher (Beam's `BatchElements`
batches without a key, and `GroupIntoBatches` groups first, so neither serves before a grouping).

Usage:
  batcher = BucketBatcher(batch=500)
  for name, path in files:
    yield from batcher.add(name_bucket(name, buckets), (name, path))   # (bucket, [items])
  yield from batcher.drain()                                         # the rest, every bucket
"""
import itertools
import pickle
import zlib
from typing import Iterable, Iterator

from beam_jobs.common.name_forms import nfc

__all__ = ['BucketBatcher', 'name_bucket', 'unpack_batch', 'unpacked']


def name_bucket(image_name: str, buckets: int) -> int:
  """An image name's bucket: the crc32 of the UTF-8 bytes of its NFC form, the same in every
  process (not Python's salted hash()). NFC, so that a name and the same text in another Unicode
  normalization form ('café' composed in a CSV, decomposed on disk) meet in one bucket, where a
  join can say so. surrogatepass: a name read from a path with undecodable bytes holds lone
  surrogates."""
  return zlib.crc32(nfc(image_name).encode('utf-8', 'surrogatepass')) % buckets


class BucketBatcher:
  """Items gathered by bucket and let go as (bucket, list): a bucket's list once it holds `batch`
  items, and every list once `max_held` items are held, so memory stays bounded however many
  buckets there are.

  `packed`: each list let go is pickled into one bytes object (`unpack_batch` reads it). A local
  runner holds everything grouped as Python objects until the grouping ends, and a pickled list
  of small tuples is several times smaller than the tuples themselves.
  """

  def __init__(self, batch: int = 500, max_held: int = 100_000, packed: bool = False):
    self._batch = batch
    self._max_held = max_held
    self._packed = packed
    self._lists: dict[int, list] = {}
    self._held = 0

  def add(self, bucket: int, item) -> Iterator[tuple[int, list | bytes]]:
    items = self._lists.setdefault(bucket, [])
    items.append(item)
    self._held += 1
    if len(items) >= self._batch:
      self._held -= len(items)
      yield bucket, self._let_go(self._lists.pop(bucket))
    elif self._held >= self._max_held:
      yield from self.drain()

  def drain(self) -> Iterator[tuple[int, list | bytes]]:
    """Every list held, by bucket in the order first added; the batcher is then empty."""
    lists, self._lists, self._held = self._lists, {}, 0
    for bucket, items in lists.items():
      yield bucket, self._let_go(items)

  def _let_go(self, items: list) -> list | bytes:
    return pickle.dumps(items, pickle.HIGHEST_PROTOCOL) if self._packed else items


def unpack_batch(packed: bytes) -> list:
  """The items of one list that a `packed` `BucketBatcher` let go."""
  return pickle.loads(packed)


def unpacked(batches: Iterable[bytes]) -> Iterator:
  """The items of packed lists, one after another."""
  return itertools.chain.from_iterable(map(unpack_batch, batches))
