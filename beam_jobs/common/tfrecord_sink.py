"""A fixed-shard TFRecord sink whose memory does not grow with the number of records."""
import logging
import shutil
import uuid
import zlib
from typing import Iterable, Iterator

import apache_beam as beam
from apache_beam.io import tfrecordio
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.display import DisplayDataItem
from apache_beam.transforms.window import GlobalWindows

from model import schema

__all__ = ['WriteShardParts', 'WriteSplit', 'concatenate_parts', 'delete_parts_dir',
           'shard_glob', 'shard_path']

# The --compression names of model/schema.py, as Beam's FileSystems spells them.
_BEAM_COMPRESSION = {'none': CompressionTypes.UNCOMPRESSED, 'gzip': CompressionTypes.GZIP}
_COPY_CHUNK_BYTES = 1 << 20

_log = logging.getLogger('planet.tfrecord_sink')


def shard_path(file_path_prefix: str, shard: int, num_shards: int, compression: str) -> str:
  """<prefix>-SSSSS-of-NNNNN.tfrecord[.gz], the names Beam's own file sinks give."""
  return (f'{file_path_prefix}-{shard:05d}-of-{num_shards:05d}'
          f'{schema.SHARD_SUFFIXES[compression]}')


def shard_glob(file_path_prefix: str, compression: str) -> str:
  """The pattern (fnmatch, FileSystems.match) that every `shard_path` of a prefix matches."""
  return f'{file_path_prefix}-?????-of-?????{schema.SHARD_SUFFIXES[compression]}'


class WriteShardParts(beam.DoFn):
  """Serialised records -> one uncompressed TFRecord part per (bundle, shard): (shard, part path).

  A record's shard is the crc32 of its bytes modulo the number of shards: which shard holds a
  record does not depend on the runner or its bundles.
  """

  def __init__(self, parts_dir: str, num_shards: int, shard_pattern: str):
    self._parts_dir = parts_dir
    self._num_shards = num_shards
    self._shard_pattern = shard_pattern
    self._parts = {}

  def display_data(self):
    return {'file_pattern': DisplayDataItem(self._shard_pattern, label='File Pattern'),
            'shards': DisplayDataItem(self._num_shards, label='Number of Shards')}

  def start_bundle(self):
    self._parts = {}   # shard -> (part path, open file)

  def process(self, serialized: bytes) -> None:
    shard = zlib.crc32(serialized) % self._num_shards
    if shard not in self._parts:
      path = FileSystems.join(self._parts_dir, f'{shard:05d}-{uuid.uuid4().hex}.tfrecord')
      self._parts[shard] = path, FileSystems.create(
          path, compression_type=CompressionTypes.UNCOMPRESSED)
    # The record framing (length, masked crc32c) that WriteToTFRecord itself writes: Beam's
    # private helper, kept rather than restating the framing here.
    write_record = tfrecordio._TFRecordUtil.write_record  # pylint: disable=protected-access
    write_record(self._parts[shard][1], serialized)

  def finish_bundle(self) -> Iterator:
    for shard, (path, handle) in sorted(self._parts.items()):
      handle.close()
      yield GlobalWindows.windowed_value((shard, path))
    self._parts = {}


def concatenate_parts(element: tuple[int, Iterable[str | None]], file_path_prefix: str,
                      num_shards: int, compression: str) -> str:
  """(shard, part paths) -> the shard: its parts one after another, compressed as written.

  Uncompressed TFRecord files concatenate into a valid TFRecord file; the parts are streamed,
  never held whole.
  """
  shard, parts = element
  parts = sorted(part for part in parts if part is not None)
  path = shard_path(file_path_prefix, shard, num_shards, compression)
  with FileSystems.create(path, compression_type=_BEAM_COMPRESSION[compression]) as out:
    for part in parts:
      with FileSystems.open(part, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        shutil.copyfileobj(f, out, _COPY_CHUNK_BYTES)
  if parts:
    FileSystems.delete(parts)
  return path


def delete_parts_dir(_, parts_dir: str, written: list[str]) -> list[str]:
  """Removes the parts' folder once every shard is written (best effort, as Beam's sinks do)."""
  try:
    FileSystems.delete([parts_dir])
  except (IOError, BeamIOError):
    _log.info('could not delete %s (parts of failed bundles may remain there; the next run '
              'clears them)', parts_dir)
  return sorted(written)


@beam.ptransform_fn
@beam.typehints.with_input_types(bytes)
@beam.typehints.with_output_types(list[str])
def WriteSplit(records, file_path_prefix: str, num_shards: int,  # pylint: disable=invalid-name
               compression: str):
  """Serialised records -> `num_shards` TFRecord shards <prefix>-SSSSS-of-NNNNN.tfrecord[.gz].

  Not `WriteToTFRecord(num_shards=N)`: it groups the records themselves by shard, and a runner
  without an external shuffle (the DirectRunner) holds that group in memory, so a local run's
  peak memory grew with the number of records (about 200 KB more per 128 px chip: 8 GB for the
  40,479 real chips). Here each bundle writes its records into one part file per shard, only the
  part names are grouped, and each shard is its parts concatenated (tests/test_reliability_serving).

  Usage:
    examples | 'WriteTrain' >> WriteSplit('out/train/part', num_shards=4, compression='gzip')

  Returns:
    A PCollection of one element: the sorted paths of the shards written.
  """
  directory, name = FileSystems.split(file_path_prefix)
  # Beside the shards, like Beam's beam-temp-* folders; a run that dies leaves it for the next
  # run's clean-up of the split folder.
  parts_dir = FileSystems.join(directory, f'beam-temp-{name}-parts-{uuid.uuid4().hex}')
  shard_pattern = (f'{file_path_prefix}-%(shard_num)05d-of-%(num_shards)05d'
                   f'{schema.SHARD_SUFFIXES[compression]}')
  parts = records | 'WriteParts' >> beam.ParDo(
      WriteShardParts(parts_dir, num_shards, shard_pattern))
  # Every shard is written, an empty one too, so a split always has num_shards files.
  every_shard = (records.pipeline
                 | 'EveryShard' >> beam.Create([(shard, None) for shard in range(num_shards)]))
  written = ((parts, every_shard)
             | 'WithEveryShard' >> beam.Flatten()
             | 'GroupPartsByShard' >> beam.GroupByKey()
             | 'ConcatenateParts' >> beam.Map(concatenate_parts, file_path_prefix, num_shards,
                                              compression))
  return (records.pipeline
          | 'AfterShards' >> beam.Create([None])
          | 'DeleteParts' >> beam.Map(delete_parts_dir, parts_dir,
                                      written=beam.pvalue.AsList(written)))
