"""Around the preprocess pipeline: the output folder claim, the manifest and the summary."""
import json

from apache_beam.io.filesystems import FileSystems

from beam_jobs.common import dead_letters
from beam_jobs.common.tfrecord_sink import shard_glob
from beam_jobs.preprocess.config import (SHARD_FILE_PREFIX, CsvFacts,
                                         PreprocessConfig)
from beam_jobs.preprocess.rules import (CSV_ROWS, DEAD_LETTERED_ROWS, DEAD_LETTERS, EXAMPLES,
                                        ROWS_WITHOUT_WEATHER, counts_from_tally)
from model import manifest as manifest_lib
from model import schema
from model.output_dir import (FolderClaim, OutputLayout, claim_output_dir,
                              with_beam_temporaries)

__all__ = ['LAYOUT', 'build_manifest', 'list_dead_letters', 'list_shards', 'prepare_output_dir',
           'read_counts', 'summary']

# Everything this job writes under OUT: only these files are ever deleted by --overwrite.
LAYOUT = OutputLayout(schema.STAGE_PREPROCESS, with_beam_temporaries(
    schema.COUNTS_FILE,
    dead_letters.FILE_PATTERN,
    *(shard_glob(f'{split}/{SHARD_FILE_PREFIX}', compression) for split in schema.SPLITS
      for compression in schema.COMPRESSIONS)))


def prepare_output_dir(config: PreprocessConfig, overwrite: bool) -> FolderClaim:
  """Claims --output_dir for this run (model/output_dir.py), or refuses before touching it.

  A finished run is replaced only with --overwrite, and so are the files of a killed or failed
  one: Beam names shards -SSSSS-of-NNNNN, and a stale set of another N must never sit beside new
  ones. Anything else in the folder, a run still working in it, or an overlap with an input, is
  refused. The claim is held until released (the end of the run).
  """
  return claim_output_dir(config.output_dir, LAYOUT, overwrite,
                          inputs={'--images_dir': config.images_dir,
                                  '--labels_csv': config.labels_csv})


def read_counts(config: PreprocessConfig) -> dict[str, int]:
  """The pipeline's flat tally, from counts.json ({} when nothing was counted)."""
  with FileSystems.open(config.counts_path) as f:
    text = f.read().decode('utf-8').strip()
  return json.loads(text) if text else {}


def _file_names(pattern: str) -> list[str]:
  return sorted(FileSystems.split(m.path)[1] for m in FileSystems.match([pattern])[0].metadata_list)


def list_shards(config: PreprocessConfig) -> dict[str, list[str]]:
  """Shard paths per split, relative to the output folder, sorted."""
  return {split: [f'{split}/{name}' for name in _file_names(
              shard_glob(config.shard_prefix(split), config.compression))]
          for split in schema.SPLITS}


def list_dead_letters(config: PreprocessConfig) -> list[str]:
  """Dead-letter files, relative to the output folder, sorted."""
  return [f'{schema.DEAD_LETTERS_DIR}/{name}'
          for name in _file_names(config.dead_letters_prefix + '*.jsonl')]


def build_manifest(config: PreprocessConfig, facts: CsvFacts, tally: dict[str, int],
                   shards: dict[str, list[str]], runner: str, seconds: float) -> dict:
  """The manifest.json of a finished run: inputs, options, shards, counts (the training's input)."""
  counts, label_counts = counts_from_tally(tally)
  return {
      'stage': schema.STAGE_PREPROCESS,
      'created': manifest_lib.utc_timestamp(),
      'inputs': {'labels_csv': config.labels_csv, 'labels_csv_sha256': facts.sha256,
                 'labels_csv_format': facts.csv_format, 'images_dir': config.images_dir},
      'options': {'image_size': config.image_size, 'eval_fraction': config.eval_fraction,
                  'num_shards': dict(config.num_shards), 'compression': config.compression,
                  'max_bad_fraction': config.max_bad_fraction, 'max_pixels': config.max_pixels,
                  'runner': runner},
      'image_size': config.image_size,
      'compression': config.compression,
      'shards': shards,
      'dead_letters': list_dead_letters(config),
      'counts': counts,
      'label_counts': label_counts,
      'seconds': round(seconds, 1),
  }


def summary(manifest: dict, output_dir: str) -> str:
  """The lines printed at the end of a run: what came in, what came out, what to look at."""
  counts = manifest['counts']
  examples = counts[EXAMPLES]
  total = sum(examples.values())
  lines = [
      f'preprocess: {counts[CSV_ROWS]:,} CSV rows -> {total:,} examples '
      f'(train {examples["train"]:,}, eval {examples["eval"]:,}) + '
      f'{counts[DEAD_LETTERED_ROWS]:,} dead-lettered rows, in {manifest["seconds"]} s '
      f'({total / max(manifest["seconds"], 1e-9):,.1f} examples/s)',
  ]
  for split in schema.SPLITS:
    if not examples[split]:
      lines.append(f'  warning: the {split} split is empty; training needs examples in both')
  for reason, n in counts[DEAD_LETTERS].items():
    lines.append(f'  dead letters {reason}: {n:,}')
  if counts[ROWS_WITHOUT_WEATHER]:
    lines.append(f'  rows without a weather tag (kept, weather all zeros): '
                 f'{counts[ROWS_WITHOUT_WEATHER]}')
  lines.append(f'  shards: train {len(manifest["shards"]["train"])}, '
               f'eval {len(manifest["shards"]["eval"])}; manifest '
               f'{manifest_lib.manifest_path(output_dir)}')
  return '\n'.join(lines)
