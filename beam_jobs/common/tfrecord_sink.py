"""A fixed-shard TFRecord sink that writes each record once and holds no record in a grouping.

Records are written where they are made, into part files: one per (bundle, shard), compressed as
the shard will be. Only the part names are grouped by shard. A shard made of one part is that part
renamed, so on a local run (one bundle per worker) every byte is written once; a shard of several
parts is their bytes one after another (TFRecord framing and gzip members both concatenate into a
valid file, read whole by tf.data and by Beam's TFRecord reader), copied without recompressing.

Not `WriteToTFRecord(num_shards=N)`: it groups the records themselves by shard, and a runner
without an external shuffle (the DirectRunner) holds that group in memory, so a local run's peak
memory grew with the number of records (about 200 KB more per 128 px chip: 8 GB for the 40,479
real chips; tests/test_reliability_serving.py).

Usage (records written inside a DoFn that does more: the preprocess job's fused encoder):
  parts = ShardPartWriter(parts_dir_for(prefix), 'gzip'); parts.write(shard, record); ...
  yield from parts.close()                          # (shard, part path) pairs, in finish_bundle
  part_names | PublishShards(prefix, num_shards, 'gzip', parts_dir)
(or, in a process of its own: append_part(part_path(parts_dir, shard, token, 'gzip'), framed))
"""
import uuid
import zlib
from typing import Iterable

import apache_beam as beam
from apache_beam.io import tfrecordio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_jobs.common.part_files import publish_parts, remove_parts_dir
from model import schema

__all__ = ['PublishShards', 'ShardPartWriter', 'append_part', 'delete_parts_dir', 'part_path',
           'parts_dir_for', 'publish_shard', 'shard_glob', 'shard_path', 'shard_pattern',
           'write_record']

# The --compression names of model/schema.py, as Beam's FileSystems spells them.
_BEAM_COMPRESSION = {'none': CompressionTypes.UNCOMPRESSED, 'gzip': CompressionTypes.GZIP}


def shard_path(file_path_prefix: str, shard: int, num_shards: int, compression: str) -> str:
  """<prefix>-SSSSS-of-NNNNN.tfrecord[.gz], the names Beam's own file sinks give."""
  return (f'{file_path_prefix}-{shard:05d}-of-{num_shards:05d}'
          f'{schema.SHARD_SUFFIXES[compression]}')


def shard_glob(file_path_prefix: str, compression: str) -> str:
  """The pattern (fnmatch, FileSystems.match) that every `shard_path` of a prefix matches."""
  return f'{file_path_prefix}-?????-of-?????{schema.SHARD_SUFFIXES[compression]}'


def shard_pattern(file_path_prefix: str, compression: str) -> str:
  """The shard names as Beam's sinks display them (a Dataflow job's 'File Pattern')."""
  return (f'{file_path_prefix}-%(shard_num)05d-of-%(num_shards)05d'
          f'{schema.SHARD_SUFFIXES[compression]}')


def parts_dir_for(file_path_prefix: str) -> str:
  """A new folder for one run's parts, beside the shards (like Beam's beam-temp-* folders).

  A run that dies leaves it for the next run's clean-up of the split folder (model/output_dir.py).
  """
  directory, name = FileSystems.split(file_path_prefix)
  return FileSystems.join(directory, f'beam-temp-{name}-parts-{uuid.uuid4().hex}')


def part_path(parts_dir: str, shard: int, token: str, compression: str) -> str:
  """A part file of `shard` in `parts_dir`; `token` names its writer (a bundle, a process)."""
  return FileSystems.join(parts_dir, f'{shard:05d}-{token}{schema.SHARD_SUFFIXES[compression]}')


def write_record(file, record: bytes) -> None:
  """Writes one record with the framing (length, masked crc32c) that WriteToTFRecord writes:
  Beam's private helper, kept rather than restating the framing here."""
  tfrecordio._TFRecordUtil.write_record(file, record)  # pylint: disable=protected-access


def append_part(path: str, framed: bytes, compression: str) -> None:
  """Appends framed records to a local part file; compressed, as one more gzip member (gzip
  members concatenate into one valid file)."""
  if compression == 'gzip':
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    framed = compressor.compress(framed) + compressor.flush()
  with open(path, 'ab') as f:
    f.write(framed)


class ShardPartWriter:
  """One bundle's part files: one per shard it has records for, compressed as the shard will be.

  A part is created on its first record, so no part is ever empty (tf.data stops reading a gzip
  file at an empty member). Not thread-safe: one writer per bundle, written from one thread.
  """

  def __init__(self, parts_dir: str, compression: str):
    self._parts_dir = parts_dir
    self._compression = compression
    self._parts = {}   # shard -> (part path, open file)
    self.bytes_written = 0

  def write(self, shard: int, record: bytes) -> None:
    if shard not in self._parts:
      path = part_path(self._parts_dir, shard, uuid.uuid4().hex, self._compression)
      self._parts[shard] = path, FileSystems.create(
          path, compression_type=_BEAM_COMPRESSION[self._compression])
    write_record(self._parts[shard][1], record)
    self.bytes_written += len(record)

  def close(self) -> list[tuple[int, str]]:
    """Closes every part; returns (shard, part path) for each, by shard."""
    closed = []
    for shard, (path, handle) in sorted(self._parts.items()):
      handle.close()
      closed.append((shard, path))
    self._parts = {}
    return closed


def publish_shard(element: tuple[int, Iterable[str | None]], file_path_prefix: str,
                  num_shards: int, compression: str) -> str:
  """(shard, part paths) -> the shard: its one part renamed, or its parts' bytes concatenated.

  No part: an empty shard (a valid empty gzip file when compressed). Otherwise
  `part_files.publish_parts`: safe to run again after it succeeded (a retried step).
  """
  shard, parts = element
  parts = sorted(part for part in parts if part is not None)
  path = shard_path(file_path_prefix, shard, num_shards, compression)
  if not parts:
    # Created through the compressor, so that an empty gzip shard is a valid (empty) gzip file.
    with FileSystems.create(path, compression_type=_BEAM_COMPRESSION[compression]):
      pass
    return path
  return publish_parts(parts, path)


def delete_parts_dir(_, parts_dir: str, written: list[str]) -> list[str]:
  """Removes the parts' folder once every shard is written; passes the shards' paths on, sorted."""
  remove_parts_dir(parts_dir)
  return sorted(written)


@beam.ptransform_fn
@beam.typehints.with_input_types(tuple[int, str])
@beam.typehints.with_output_types(list[str])
def PublishShards(part_names, file_path_prefix: str,  # pylint: disable=invalid-name
                  num_shards: int, compression: str, parts_dir: str):
  """(shard, part path) pairs -> `num_shards` shards <prefix>-SSSSS-of-NNNNN.tfrecord[.gz].

  Only the part names are grouped; every shard is written, an empty one too, so a split always
  has `num_shards` files; then `parts_dir` is removed.

  Returns:
    A PCollection of one element: the sorted paths of the shards written.
  """
  every_shard = (part_names.pipeline
                 | 'EveryShard' >> beam.Create([(shard, None) for shard in range(num_shards)]))
  written = ((part_names, every_shard)
             | 'WithEveryShard' >> beam.Flatten()
             | 'GroupPartsByShard' >> beam.GroupByKey()
             | 'PublishShard' >> beam.Map(publish_shard, file_path_prefix, num_shards,
                                          compression))
  return (part_names.pipeline
          | 'AfterShards' >> beam.Create([None])
          | 'DeleteParts' >> beam.Map(delete_parts_dir, parts_dir,
                                      written=beam.pvalue.AsList(written)))
