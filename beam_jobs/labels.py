"""Label files: the Kaggle format and the original tutorial's, parsed row by row into vectors.

Kaggle (`train_v2.csv`):          image_name,tags                     train_1,agriculture clear primary
Tutorial (`KagglePlanetMCML.csv`): image_name,weather_labels,ground_labels
                                   train_1,"[1, 0, 0, 0]","[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]"

The format is detected from the header. Each row either becomes a `LabelRow` or raises
`InputRefused` with a reason code; a bad row never stops the others.
"""
import csv
import dataclasses
import enum
from typing import Iterable, Iterator

from apache_beam.io.filesystems import FileSystems

from model import schema
from model.errors import InputRefused, Reason

# A real row is under 200 characters; a longer one is garbage or an attack on the parser.
MAX_LINE_CHARS = 10_000
MAX_NAME_CHARS = 255

_WEATHER_INDEX = {label: i for i, label in enumerate(schema.WEATHER_LABELS)}
_GROUND_INDEX = {label: i for i, label in enumerate(schema.GROUND_LABELS)}


class CsvFormat(str, enum.Enum):
  KAGGLE = 'kaggle'        # image_name,tags
  TUTORIAL = 'tutorial'    # image_name,weather_labels,ground_labels


_HEADERS = {
    ('image_name', 'tags'): CsvFormat.KAGGLE,
    ('image_name', 'weather_labels', 'ground_labels'): CsvFormat.TUTORIAL,
}


@dataclasses.dataclass(frozen=True)
class LabelRow:
  """One labelled image: its name and its label vectors in the schema's order."""
  image_name: str
  weather: tuple[float, ...]   # one-hot over schema.WEATHER_LABELS, or all zeros
  ground: tuple[float, ...]    # multi-hot over schema.GROUND_LABELS

  @property
  def has_weather(self) -> bool:
    return any(self.weather)

  @property
  def tags(self) -> list[str]:
    """The labels set in this row, weather first, in the schema's order."""
    return ([l for l, v in zip(schema.WEATHER_LABELS, self.weather) if v] +
            [l for l, v in zip(schema.GROUND_LABELS, self.ground) if v])


def detect_format(header: str | bytes) -> CsvFormat:
  """Says which label format a header line belongs to.

  Raises:
    ValueError: the header is neither format's (a configuration error: fail before the job).
  """
  if isinstance(header, bytes):
    header = header.decode('utf-8', errors='replace')
  columns = tuple(c.strip().lower() for c in header.lstrip('\ufeff').strip().split(','))
  try:
    return _HEADERS[columns]
  except KeyError:
    raise ValueError(
        f'unrecognised labels CSV header {",".join(columns)!r}: expected '
        '"image_name,tags" (Kaggle train_v2.csv) or '
        '"image_name,weather_labels,ground_labels" (the tutorial\'s KagglePlanetMCML.csv)'
    ) from None


def validate_image_name(name: str) -> str:
  """Returns `name` if it is a plain file stem, else raises BAD_IMAGE_NAME.

  The name is joined to the images folder, so it must never be able to reach outside it.
  """
  problem = None
  if not name:
    problem = 'the image name is empty'
  elif len(name) > MAX_NAME_CHARS:
    problem = f'the image name is {len(name)} characters long (limit {MAX_NAME_CHARS})'
  elif any(c in name for c in '/\\:') or '..' in name:
    problem = (f'the image name {name[:80]!r} is not a plain file stem: path separators, "..", '
               'drive letters and URL schemes are refused')
  elif name.startswith('.') or any(ord(c) < 32 or ord(c) == 127 for c in name):
    problem = f'the image name {name[:80]!r} starts with "." or holds control characters'
  if problem:
    raise InputRefused(Reason.BAD_IMAGE_NAME, problem + '; use the file name without extension')
  return name


def _parse_tags(field: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  weather = [0.0] * schema.NUM_WEATHER
  ground = [0.0] * schema.NUM_GROUND
  tags = field.split()
  if not tags:
    raise InputRefused(Reason.EMPTY_TAGS, 'the row has no tags; every image needs at least one')
  for tag in tags:
    if tag in _WEATHER_INDEX:
      weather[_WEATHER_INDEX[tag]] = 1.0
    elif tag in _GROUND_INDEX:
      ground[_GROUND_INDEX[tag]] = 1.0
    else:
      raise InputRefused(
          Reason.UNKNOWN_TAG,
          f'unknown tag {tag[:80]!r}; known tags: {" ".join(schema.ALL_LABELS)}')
  return tuple(weather), tuple(ground)


def _parse_vector(field: str, length: int, what: str) -> tuple[float, ...]:
  body = field.strip()
  if not (body.startswith('[') and body.endswith(']')):
    raise InputRefused(Reason.MALFORMED_ROW, f'{what} {field[:80]!r} is not a list like "[0, 1]"')
  items = [v.strip() for v in body[1:-1].split(',')]
  if len(items) != length or any(v not in ('0', '1', '0.0', '1.0') for v in items):
    raise InputRefused(
        Reason.MALFORMED_ROW, f'{what} {field[:80]!r} must be {length} values, each 0 or 1')
  return tuple(float(v) for v in items)


def parse_label_line(line: str | bytes, fmt: CsvFormat) -> LabelRow:
  """Parses one data line of a labels CSV (no header) into a `LabelRow`.

  Raises:
    InputRefused: MALFORMED_ROW, BAD_IMAGE_NAME, UNKNOWN_TAG, EMPTY_TAGS or MULTIPLE_WEATHER.
  """
  if len(line) > MAX_LINE_CHARS:
    raise InputRefused(
        Reason.MALFORMED_ROW, f'the line is {len(line)} characters long (limit {MAX_LINE_CHARS})')
  if isinstance(line, bytes):
    try:
      line = line.decode('utf-8')
    except UnicodeDecodeError as e:
      raise InputRefused(Reason.MALFORMED_ROW, f'the line is not UTF-8 ({e}); save the CSV as UTF-8')
  try:
    fields = next(csv.reader([line.rstrip('\r\n')], strict=True), [])
  except csv.Error as e:
    raise InputRefused(Reason.MALFORMED_ROW, f'not a CSV line ({e})') from None
  expected = 2 if fmt is CsvFormat.KAGGLE else 3
  if len(fields) != expected:
    raise InputRefused(
        Reason.MALFORMED_ROW,
        f'expected {expected} fields for the {fmt.value} format, found {len(fields)}')
  name = validate_image_name(fields[0].strip())
  if fmt is CsvFormat.KAGGLE:
    weather, ground = _parse_tags(fields[1])
  else:
    weather = _parse_vector(fields[1], schema.NUM_WEATHER, 'weather_labels')
    ground = _parse_vector(fields[2], schema.NUM_GROUND, 'ground_labels')
    if not any(weather) and not any(ground):
      raise InputRefused(Reason.EMPTY_TAGS, 'the row has no labels set; every image needs one')
  if sum(weather) > 1:
    found = [l for l, v in zip(schema.WEATHER_LABELS, weather) if v]
    raise InputRefused(
        Reason.MULTIPLE_WEATHER,
        f'more than one weather tag ({" ".join(found)}); an image has at most one')
  return LabelRow(name, weather, ground)


def read_label_lines(path: str) -> tuple[CsvFormat, Iterator[tuple[int, bytes]]]:
  """Opens a labels CSV (local or gs://) and returns its format and its data lines.

  Lines come as `(line_number, raw_bytes)`, numbered from 1 for the header, blank lines skipped;
  bytes rather than text so that one non-UTF-8 row is refused alone, not the whole file.

  Raises:
    ValueError: the header is not a labels header.
    FileNotFoundError / OSError: the file cannot be read.
  """
  handle = FileSystems.open(path)
  header = handle.readline()
  if header.startswith(b'\xef\xbb\xbf'):
    header = header[3:]
  fmt = detect_format(header)

  def lines() -> Iterator[tuple[int, bytes]]:
    with handle:
      for number, raw in enumerate(handle, start=2):
        raw = raw.rstrip(b'\r\n')
        if raw.strip():
          yield number, raw
  return fmt, lines()


def parse_label_file(path: str) -> tuple[dict[str, LabelRow], list[tuple[int, InputRefused]]]:
  """Reads a whole labels file: the good rows by image name, and the refused lines.

  For inputs that fit in memory (scoring predictions against labels); the preprocess job does the
  same row by row inside the pipeline.
  """
  fmt, lines = read_label_lines(path)
  by_name: dict[str, list[tuple[int, LabelRow]]] = {}
  refused = []
  for number, raw in lines:
    try:
      row = parse_label_line(raw, fmt)
    except InputRefused as e:
      refused.append((number, e))
      continue
    by_name.setdefault(row.image_name, []).append((number, row))
  rows = {}
  for name, occurrences in by_name.items():
    kept, duplicates = resolve_duplicates(occurrences)
    if kept is not None:
      rows[name] = kept
    refused.extend((n, InputRefused(Reason.DUPLICATE_NAME, why)) for n, why in duplicates)
  return rows, sorted(refused, key=lambda r: r[0])


def resolve_duplicates(
    occurrences: Iterable[tuple[int, LabelRow]]) -> tuple[LabelRow | None, list[tuple[int, str]]]:
  """Applies the duplicate rule to every row that names one image.

  Rule: identical duplicates keep the first occurrence by line number, later ones are refused;
  conflicting duplicates are all refused, since no rule can say which one is right.

  Returns:
    (the row to keep or None, [(line_number, why) for each refused occurrence]).
  """
  ordered = sorted(occurrences, key=lambda o: o[0])
  first_line, first = ordered[0]
  if len(ordered) == 1:
    return first, []
  lines = ', '.join(str(n) for n, _ in ordered)
  if all(row == first for _, row in ordered):
    return first, [(n, f'identical duplicate of line {first_line}; only the first is used')
                   for n, _ in ordered[1:]]
  return None, [(n, f'{first.image_name} appears on lines {lines} with different labels; '
                    'all are refused: fix the CSV so each image appears once')
                for n, _ in ordered]
