"""The preprocess rules as plain functions: split, shard count, join, tally, conservation.

Usage:
  assign_split('train_1', 0.2)         # 'eval'
  example_shard('train_1', 4)          # the shard of its split that holds its Example
"""
import collections
import csv
import hashlib
import math
import posixpath
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from beam_jobs.common import dead_letters, labels, metrics
from beam_jobs.common.image_decoder import DEFAULT_MAX_PIXELS, decode_image
from beam_jobs.common.labels import LabelRow
from beam_jobs.common.name_forms import mismatch_text, nfc
from model import schema
from model.errors import Reason
from model.tf_example import build_example

__all__ = ['CSV_ROWS', 'DEAD_LETTERED_ROWS', 'DEAD_LETTERS', 'EXAMPLES', 'EncodedExample',
           'IMAGES_WITHOUT_ROWS', 'LABELS', 'LabelledImage', 'ROWS_WITHOUT_WEATHER',
           'assign_split', 'check_conservation', 'counter_name', 'counts_from_tally',
           'estimate_num_shards', 'example_shard', 'image_to_example', 'join_buckets',
           'join_one_bucket', 'join_rows_with_image', 'raw_image_name',
           'row_dead_letter', 'tally_dead_letter', 'tally_example', 'tally_key']

# Shards of 100-200 MB: big enough that opening one costs nothing next to reading it, small
# enough that tf.data can interleave many and a lost worker redoes little.
MAX_SHARD_BYTES = 200 * 2**20
# An Example is its pixels plus name, sha256, shape and 17 labels (~250 bytes of protobuf).
EXAMPLE_OVERHEAD_BYTES = 256

# The join groups image names in buckets of about this many CSV rows: one grouped element, and
# one call of the encoder, per bucket rather than per image (Beam's per-element cost, ~20 us
# through a shuffle, is paid by a few hundred names at once), and still enough buckets to keep
# every worker busy (Beam hands the buckets to its workers in turn; a local run's encoder
# processes take batches of any bucket).
JOIN_BUCKET_ROWS = 1000
# Buckets when the CSV was not read before the job (a Dataflow dry run of a remote CSV).
UNKNOWN_SIZE_JOIN_BUCKETS = 1000

# The tally: what the job counts. Each fact is a key of counts.json, from which the manifest's
# `counts` are built, and a Beam counter; `tally_key` and `counter_name` spell both.
CSV_ROWS = 'csv_rows'
DEAD_LETTERED_ROWS = 'dead_lettered_rows'
IMAGES_WITHOUT_ROWS = 'images_without_rows'
ROWS_WITHOUT_WEATHER = 'rows_without_weather'
EXAMPLES = 'examples'            # examples/<split>
LABELS = 'labels'                # labels/<split>/<label>
DEAD_LETTERS = metrics.DEAD_LETTERS   # dead_letters/<REASON>


def tally_key(*parts: str) -> str:
  """A fact's key in counts.json: ('labels', 'train', 'clear') -> 'labels/train/clear'."""
  return '/'.join(parts)


def counter_name(key: str) -> str:
  """The Beam counter of the same fact: 'labels/train/clear' -> 'labels_train_clear'.

  beam_jobs.common.dead_letters counts dead letters by reason under this spelling too
  (metrics.dead_letters_of); docs/preprocess.md documents both spellings.
  """
  return key.replace('/', '_')


def assign_split(image_name: str, eval_fraction: float) -> str:
  """Says which split an image belongs to, from its name alone.

  The first 8 bytes of sha256(name), read as a fraction of 2**64, put the image in eval when
  below `eval_fraction`. E.g. sha256('train_1') starts 0668b6398665dc06, i.e. 0.0250, so with
  eval_fraction=0.2 train_1 is in eval; sha256('train_0') starts 6cb944039553d0cc = 0.4247, so
  train_0 is in train. Stable across runs, machines, workers and Python versions (unlike
  Python's salted hash()), and monotone: raising eval_fraction only moves images from train to
  eval, never back.
  """
  position = int.from_bytes(hashlib.sha256(image_name.encode('utf-8')).digest()[:8], 'big')
  return 'eval' if position < eval_fraction * 2**64 else 'train'


def join_buckets(csv_rows: int | None) -> int:
  """How many join buckets a CSV of `csv_rows` rows is grouped into (JOIN_BUCKET_ROWS each)."""
  if csv_rows is None:
    return UNKNOWN_SIZE_JOIN_BUCKETS
  return max(1, math.ceil(csv_rows / JOIN_BUCKET_ROWS))


def example_shard(image_name: str, num_shards: int) -> int:
  """The shard of a split that holds an image's Example: from its name alone (a salted sha256,
  far cheaper than hashing the 48 KB Example). Not a crc32: crc32 is linear, so a salted crc32
  of the names in one join bucket (`buckets.name_bucket`, the same crc32 modulo the buckets)
  would share their low bits and send a whole bucket to one shard."""
  digest = hashlib.sha256(b'shard:' + image_name.encode('utf-8', 'surrogatepass')).digest()
  return int.from_bytes(digest[:8], 'big') % num_shards


def estimate_num_shards(csv_rows: int, image_size: int, split_fraction: float) -> int:
  """Shards for one split so that each holds at most MAX_SHARD_BYTES (100-200 MB when >1)."""
  example_bytes = image_size * image_size * schema.CHANNELS + EXAMPLE_OVERHEAD_BYTES
  return max(1, math.ceil(csv_rows * split_fraction * example_bytes / MAX_SHARD_BYTES))


def raw_image_name(raw: bytes) -> str:
  """The first field of a CSV line as text, for naming a line that could not be parsed."""
  text = raw.decode('utf-8', errors='replace')
  try:
    first = next(csv.reader([text]), [''])[0]
  except (csv.Error, IndexError):
    first = text.split(',', 1)[0]
  return first.strip()[:labels.MAX_NAME_CHARS]


def image_to_example(row: LabelRow, data: bytes, image_size: int,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
  """The hot path: one file's bytes, hashed and decoded once, to a serialised Example.

  Raises:
    InputRefused: from the decoder (EMPTY_FILE, NOT_AN_IMAGE, TRUNCATED_IMAGE, ...).
  """
  pixels = decode_image(data, image_size, max_pixels=max_pixels)
  return build_example(row, pixels, hashlib.sha256(data).hexdigest())


def join_one_bucket(rows: Iterable[tuple[str, int, int]],
                    refused_names: Iterable[tuple[str, int]], files: Iterable[tuple[str, str]],
                    expected_path: Callable[[str], str]) -> Iterator:
  """Everything in one join bucket -> `join_rows_with_image` for each name, in name order.

  Names match exactly, as the file system does. A row without its file, or a file without its
  row, whose name is the same text as another's in another Unicode normalization form (all such
  meet in one bucket: `buckets.name_bucket`) is not matched to it, but its dead letter names
  the other.

  Args:
    rows: (name, line, LabelRow.label_bits) of the parsed CSV rows; a LabelRow is built only for
      a name that has a file or several rows.
    refused_names: (name, line) of the lines refused while parsing that gave a name.
    files: (name, path) of the image files listed.
    expected_path: name -> where its file should be (only called for a row without a file).

  Yields:
    (LabelledImage or None, dead letters) for each name.
  """
  by_name = collections.defaultdict(lambda: ([], [], []))
  for name, line, bits in rows:
    by_name[name][0].append((line, bits))
  for name, line in refused_names:
    by_name[name][1].append(line)
  for name, path in files:
    by_name[name][2].append(path)
  forms = None   # NFC form -> the names with that form, built for the first name that misses
  for name in sorted(by_name):
    name_rows, refused_lines, paths = by_name[name]
    other_form_files, other_form_rows = (), ()
    if bool(paths) != bool(name_rows or refused_lines):
      if forms is None:
        forms = collections.defaultdict(list)
        for each in by_name:
          forms[nfc(each)].append(each)
      others = [other for other in forms[nfc(name)] if other != name]
      if paths:
        other_form_rows = [other for other in others if any(by_name[other][:2])]
      else:
        other_form_files = sorted(path for other in others for path in by_name[other][2])
    if paths or len(name_rows) > 1:
      name_rows = [(line, LabelRow.from_label_bits(name, bits)) for line, bits in name_rows]
    else:   # one row without its file: only its line is needed
      name_rows = [(line, None) for line, _ in name_rows]
    yield join_rows_with_image(name, name_rows, refused_lines, paths,
                               '' if paths else expected_path(name),
                               other_form_files, other_form_rows)


class LabelledImage(NamedTuple):
  """A CSV row that survived parsing and the duplicate rule, with the file it names."""
  image_name: str
  line: int
  row: LabelRow
  path: str


class EncodedExample(NamedTuple):
  """A good image: its split, its labels (for the tally) and the serialised Example."""
  split: str
  row: LabelRow
  serialized: bytes


def row_dead_letter(image_name: str, reason: Reason, message: str, step: str, line: int,
                    path: str | None = None) -> dict:
  """The dead letter of a CSV row; it always carries its line, which conservation counts by."""
  return dead_letters.dead_letter(image_name, reason, message, schema.STAGE_PREPROCESS, path,
                                  line=line, step=step)


def join_rows_with_image(image_name: str, rows: Iterable[tuple[int, LabelRow | None]],
                         refused_lines: Iterable[int], paths: Iterable[str],
                         expected_path: str, other_form_files: Sequence[str] = (),
                         other_form_rows: Sequence[str] = ()
                         ) -> tuple[LabelledImage | None, list[dict]]:
  """Everything known about one image name -> the image to encode (or None) and dead letters.

  The file rule is the predict job's (beam_jobs/predict/rows.py pick_path): <name>.jpg with the
  extension in any case (.jpg, .JPG, .Jpg); where several such files share the name, the first
  path in sort order is the image and each other one a DUPLICATE_NAME dead letter (not a CSV
  row: it counts apart from conservation, like IMAGE_WITHOUT_ROW). Names themselves match
  exactly: the same text in two Unicode normalization forms is two names, and the dead letter of
  the one without a partner names the other (`other_form_files`, `other_form_rows`).

  Args:
    image_name: the key all inputs below share.
    rows: (line, LabelRow) for every parsed CSV row with this name; a single row of a name
      without a file may come as (line, None).
    refused_lines: lines that name this image but were refused while parsing (already
      dead-lettered; here only so that the image file is not reported as having no row).
    paths: the image files listed with this name.
    expected_path: where the row says the file is, for the MISSING_IMAGE message.
    other_form_files: files whose name is this name's text in another normalization form.
    other_form_rows: names of CSV rows that are this name's text in another normalization form.

  Returns:
    (LabelledImage or None, dead-letter records). The duplicate rule (labels.resolve_duplicates)
    runs here, so that it sees every row with the name whatever the worker that parsed it.
  """
  rows, refused_lines, paths = list(rows), list(refused_lines), sorted(set(paths))
  refused = [dead_letters.dead_letter(
      image_name, Reason.DUPLICATE_NAME, f'another file has the same image name: {paths[0]}; '
      'only that one is used (rename one of them)', schema.STAGE_PREPROCESS, path,
      step='join_images') for path in paths[1:]]
  kept, line = None, None
  if len(rows) == 1:
    (line, kept), = rows
  elif rows:
    kept, duplicates = labels.resolve_duplicates(rows)
    refused += [row_dead_letter(image_name, Reason.DUPLICATE_NAME, why, 'duplicates', line)
                for line, why in duplicates]
    line = None if kept is None else min(n for n, r in rows if r == kept)
  if line is not None:
    if paths:
      return LabelledImage(image_name, line, kept, paths[0]), refused
    refused.append(row_dead_letter(image_name, Reason.MISSING_IMAGE,
                                   _missing_image_message(image_name, expected_path,
                                                          other_form_files),
                                   'join_images', line, expected_path))
  elif paths and not rows and not refused_lines:
    # Not a CSV row, so it counts apart from conservation: listed so nobody wonders where it went.
    message = 'the image is in the folder but no CSV row names it; it was not used'
    if other_form_rows:
      message = (f'no CSV row names it, and it was not used; a row names '
                 f'{mismatch_text(image_name, other_form_rows[0])}')
    refused.append(dead_letters.dead_letter(
        image_name, Reason.IMAGE_WITHOUT_ROW, message,
        schema.STAGE_PREPROCESS, paths[0], step='join_images'))
  return None, refused


# Extensions a CSV name may carry by mistake (the job reads <images_dir>/<name>.jpg).
_NAMED_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.tif', '.tiff')


def _missing_image_message(image_name: str, expected_path: str,
                           other_form_files: Sequence[str]) -> str:
  stem, extension = posixpath.splitext(image_name)
  if not other_form_files and extension.lower() in _NAMED_EXTENSIONS:
    # A CSV of file names rather than image names: the most common slip, so say it outright.
    return (f'no file {expected_path}: the CSV names the image with its extension '
            f'({image_name!r}), and the job adds the extension itself: write the name without '
            f'it ({stem!r})')
  if not other_form_files:
    return (f'no file {expected_path} (the extension in any case): copy the image there, or '
            'drop its row from the CSV')
  other = posixpath.splitext(posixpath.basename(other_form_files[0]))[0]
  return (f'no file {expected_path}, but there is {other_form_files[0]}: '
          f'{mismatch_text(image_name, other)}')


def tally_dead_letter(record: dict) -> list[str]:
  """The tally keys one dead letter adds to (see `counts_from_tally`)."""
  keys = [tally_key(DEAD_LETTERS, record['reason'])]
  if record['reason'] == Reason.IMAGE_WITHOUT_ROW.value:
    keys.append(IMAGES_WITHOUT_ROWS)
  elif 'line' in record:
    keys.append(DEAD_LETTERED_ROWS)
  return keys


def tally_example(example: EncodedExample) -> list[str]:
  """The tally keys one written Example adds to."""
  keys = [tally_key(EXAMPLES, example.split)]
  keys += [tally_key(LABELS, example.split, label) for label in example.row.tags]
  if not example.row.has_weather:
    keys.append(ROWS_WITHOUT_WEATHER)
  return keys


def counts_from_tally(tally: dict[str, int]) -> tuple[dict, dict]:
  """The manifest's `counts` and `label_counts` from the pipeline's flat tally."""
  def under(*parts):
    prefix = tally_key(*parts, '')
    return {k[len(prefix):]: v for k, v in sorted(tally.items()) if k.startswith(prefix)}
  counts = {
      CSV_ROWS: tally.get(CSV_ROWS, 0),
      EXAMPLES: {split: tally.get(tally_key(EXAMPLES, split), 0) for split in schema.SPLITS},
      DEAD_LETTERS: under(DEAD_LETTERS),
      DEAD_LETTERED_ROWS: tally.get(DEAD_LETTERED_ROWS, 0),
      IMAGES_WITHOUT_ROWS: tally.get(IMAGES_WITHOUT_ROWS, 0),
      ROWS_WITHOUT_WEATHER: tally.get(ROWS_WITHOUT_WEATHER, 0),
  }
  label_counts = {split: {label: under(LABELS, split).get(label, 0)
                          for label in schema.ALL_LABELS} for split in schema.SPLITS}
  return counts, label_counts


def check_conservation(counts: dict) -> None:
  """Every CSV row is an Example or a dead letter, exactly once; anything else is a bug."""
  accounted = sum(counts[EXAMPLES].values()) + counts[DEAD_LETTERED_ROWS]
  if accounted != counts[CSV_ROWS]:
    raise AssertionError(
        f'{counts[CSV_ROWS]} CSV rows but {accounted} examples + dead-lettered rows: '
        'the job lost or duplicated rows; this is a bug, please report it with counts.json')
