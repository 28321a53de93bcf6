"""Label files: the Kaggle format and the original tutorial's, parsed row by row into vectors.

Kaggle (`train_v2.csv`):          image_name,tags                     train_1,agriculture clear primary
Tutorial (`KagglePlanetMCML.csv`): image_name,weather_labels,ground_labels
                                   train_1,"[1, 0, 0, 0]","[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]"

The format is detected from the header. The file is read as CSV (RFC 4180): a quoted field may
hold commas, doubled quotes and line breaks (CR, LF or CRLF), so one record may span several
physical lines. Each record either becomes a `LabelRow` or raises `InputRefused` with a reason
code; a bad record never stops the others.
"""
import collections
import csv
import dataclasses
import enum
import functools
import re
from typing import BinaryIO, Iterable, Iterator, NamedTuple

from apache_beam.io.filesystems import FileSystems

from model import schema
from model.errors import InputRefused, Reason

__all__ = [
    'CsvFormat', 'detect_format', 'has_data_rows', 'LabelRow', 'MAX_HEADER_BYTES',
    'MAX_LINE_CHARS', 'MAX_NAME_CHARS', 'parse_label_file', 'parse_label_line',
    'read_label_lines', 'resolve_duplicates', 'validate_image_name'
]

# A real row is under 200 characters; a longer one is garbage or an attack on the parser.
# Read from a file, a record is bounded in bytes (what parse_label_line measures for bytes).
MAX_LINE_CHARS = 10_000
MAX_NAME_CHARS = 255
# A real header is under 50 bytes; the bound only keeps a headerless binary file out of memory.
MAX_HEADER_BYTES = 64 * 1024
# How much is read at a time: memory for reading stays under a few times this plus the bounds.
_READ_CHUNK_BYTES = 64 * 1024
# Quoted from a bad input into a message, at most: enough to recognise it, never a flood.
_EXCERPT_CHARS = 100
_LINE_BREAK = re.compile(rb'\r\n|\r|\n')
_EXPECTED_HEADERS = ('"image_name,tags" (Kaggle train_v2.csv) or "image_name,weather_labels,'
                     'ground_labels" (the tutorial\'s KagglePlanetMCML.csv)')

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

  @property
  def label_bits(self) -> int:
    """The 17 labels as the bits of one int (weather first): how a row crosses a grouping, in
    a few bytes where the row itself pickles to ~290."""
    return sum(1 << i for i, v in enumerate(self.weather + self.ground) if v)

  @classmethod
  def from_label_bits(cls, image_name: str, bits: int) -> 'LabelRow':
    return cls(image_name, *_vectors_of_label_bits(bits))


@functools.lru_cache(maxsize=4096)
def _vectors_of_label_bits(bits: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(weather, ground) of `LabelRow.label_bits`: a CSV uses a few hundred tag sets at most, so
  each is unpacked once, not once per row."""
  values = tuple(float(bits >> i & 1) for i in range(schema.NUM_WEATHER + schema.NUM_GROUND))
  return values[:schema.NUM_WEATHER], values[schema.NUM_WEATHER:]


def _excerpt(text: str | bytes) -> str:
  """`text` quoted for a message on one line, cut to about _EXCERPT_CHARS characters."""
  if isinstance(text, bytes):
    text = text[:4 * _EXCERPT_CHARS].decode('utf-8', errors='replace')
  quoted = repr(text[:_EXCERPT_CHARS])
  # repr escapes control characters, which can make the quote several times longer than its text.
  if len(quoted) > _EXCERPT_CHARS or len(text) > _EXCERPT_CHARS:
    return quoted[:_EXCERPT_CHARS] + '...'
  return quoted


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
    raise ValueError(f'unrecognised labels CSV header {_excerpt(",".join(columns))}: expected '
                     + _EXPECTED_HEADERS) from None


_CONTROL_CHARACTER = re.compile(r'[\x00-\x1f\x7f]')


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
  elif name.startswith('.') or _CONTROL_CHARACTER.search(name):
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
  """Parses one data record of a labels CSV (no header) into a `LabelRow`.

  The record is one line, or several where a quoted field holds line breaks (as
  `read_label_lines` yields it); a line break outside quotes makes it malformed.

  Raises:
    InputRefused: MALFORMED_ROW, BAD_IMAGE_NAME, UNKNOWN_TAG, EMPTY_TAGS or MULTIPLE_WEATHER.
  """
  if len(line) > MAX_LINE_CHARS:
    # read_label_lines cuts an over-long record just past the limit, so its length says nothing.
    raise InputRefused(
        Reason.MALFORMED_ROW, f'the row is over {MAX_LINE_CHARS} characters long; a real row is '
        'under 200: check that this is the labels CSV')
  if isinstance(line, bytes):
    try:
      line = line.decode('utf-8')
    except UnicodeDecodeError as e:
      raise InputRefused(Reason.MALFORMED_ROW, f'the line is not UTF-8 ({e}); save the CSV as UTF-8')
  record = line.rstrip('\r\n')
  try:
    # One string for the whole record: the reader keeps line breaks inside quotes as text and
    # refuses one outside quotes, which would be a second record.
    fields = next(csv.reader([record], strict=True), [])
  except csv.Error as e:
    if record.count('"') % 2:
      raise InputRefused(
          Reason.MALFORMED_ROW, f'a quoted field is never closed ({e}); add the closing " or '
          'remove the stray one') from None
    raise InputRefused(
        Reason.MALFORMED_ROW, f'not a CSV row ({e}); put fields that hold commas, quotes or line '
        'breaks in double quotes, with each " inside doubled') from None
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


class _Line(NamedTuple):
  """One physical line of a file."""
  number: int       # from 1
  text: bytes       # without its line break; cut to limit + 1 bytes where `cut`
  line_break: bytes  # b'\r\n', b'\r', b'\n', or b'' for a last line without one
  cut: bool         # the line was longer than the limit; the rest of it was skipped unread


class _LineReader:
  """Physical lines from a binary file, each read with a bound on memory.

  A line ends at CRLF, CR or LF (as Python's csv module has it). A line longer than the limit is
  returned cut, and the rest of it is read in chunks and dropped, so one huge line never sits in
  memory whole.
  """

  def __init__(self, handle: BinaryIO):
    self._handle = handle
    self._buffer = b''
    self._position = 0
    self._eof = False
    self._number = 0

  def next_line(self, limit: int) -> _Line | None:
    """The next line, cut to limit + 1 bytes where longer than `limit`; None at the end."""
    cut = None
    while True:
      found = _LINE_BREAK.search(self._buffer, self._position)
      # A CR at the end of what was read may be the first half of a CRLF: read on to see.
      if found and (found.end() < len(self._buffer) or found.group() != b'\r' or self._eof):
        text = self._buffer[self._position:found.start()] if cut is None else cut
        self._position = found.end()
        return self._line(text[:limit + 1], found.group(), cut is not None or len(text) > limit)
      if cut is None and len(self._buffer) - self._position > limit + 1:
        cut = self._buffer[self._position:self._position + limit + 1]
      if cut is not None:
        # Drop what was read of the over-long line, but keep a final CR that may start a CRLF.
        self._position = found.start() if found else len(self._buffer)
      if self._eof:
        if cut is None and self._position == len(self._buffer):
          return None
        text = self._buffer[self._position:] if cut is None else cut
        self._position = len(self._buffer)
        return self._line(text, b'', cut is not None)
      chunk = self._handle.read(_READ_CHUNK_BYTES)
      self._eof = not chunk
      self._buffer = self._buffer[self._position:] + chunk
      self._position = 0

  def _line(self, text: bytes, line_break: bytes, cut: bool) -> _Line:
    self._number += 1
    return _Line(self._number, text, line_break, cut)


def _records(reader: _LineReader) -> Iterator[tuple[int, bytes]]:
  """CSV records as (number of the line they start on, bytes without the final line break).

  A record goes on to the next line while its count of `"` is odd: a quoted field is open (a
  doubled quote inside it counts two, so the parity holds). Blank lines between records are
  skipped. Every physical line ends up in exactly one record or one skipped blank line.

  A record over MAX_LINE_CHARS bytes on one line is yielded cut to MAX_LINE_CHARS + 1 bytes
  (parse_label_line refuses it) and reading goes on at the next line. A quote left open until
  the record would pass MAX_LINE_CHARS, or until the end of the file, is almost always a stray
  quote: then the record's first line alone is yielded (parse_label_line refuses it as an
  unclosed quote) and reading goes on at the line after it, re-reading the lines read ahead, so
  a stray quote costs one row rather than the rows after it. Those lines are held in memory; they
  are under MAX_LINE_CHARS bytes together.
  """
  read_ahead: collections.deque[_Line] = collections.deque()

  def next_line() -> _Line | None:
    return read_ahead.popleft() if read_ahead else reader.next_line(MAX_LINE_CHARS)

  while (first := next_line()) is not None:
    if first.cut:
      yield first.number, first.text
      continue
    if not first.text.strip():
      continue
    lines, size, quotes = [first], len(first.text), first.text.count(b'"')
    while quotes % 2:
      line = next_line()
      if line is not None and not line.cut:
        grown = size + len(lines[-1].line_break) + len(line.text)
        if grown <= MAX_LINE_CHARS:
          size, quotes = grown, quotes + line.text.count(b'"')
          lines.append(line)
          continue
      # The quote is not closed within the bound: the first line is the record alone, and the
      # lines read ahead come back, in order, before any line not yet read.
      read_ahead.extendleft(reversed(lines[1:] + ([line] if line is not None else [])))
      lines = lines[:1]
      break
    yield first.number, b''.join(
        line.text + (line.line_break if i < len(lines) - 1 else b'')
        for i, line in enumerate(lines))


def read_label_lines(path: str, digest=None) -> tuple[CsvFormat, Iterator[tuple[int, bytes]]]:
  """Opens a labels CSV (local or gs://) and returns its format and its data records.

  `digest` (a hashlib object), if given, is updated with every byte of the file as it is read,
  to its end once the records are, so that one pass both counts and hashes the file.

  Records come as `(line_number, raw_bytes)`: the number of the physical line the record starts
  on, from 1 for the header; raw_bytes without the final line break, holding the line breaks of
  a quoted field that spans lines. Blank lines are skipped. Bytes rather than text so that one
  non-UTF-8 record is refused alone, not the whole file. Every read is bounded: see `_records`
  for over-long records and unclosed quotes, which come out to be refused by `parse_label_line`.
  The header is checked here, before the first record is asked for.

  Raises:
    ValueError: the header is not a labels header (one line, quoting at most ~100 characters).
    FileNotFoundError / OSError: the file cannot be read.
  """
  handle = FileSystems.open(path)
  if digest is not None:
    handle = _Digesting(handle, digest)
  try:
    reader = _LineReader(handle)
    header = reader.next_line(MAX_HEADER_BYTES)
    if header is None:
      raise ValueError('the labels CSV is empty: expected a header line, ' + _EXPECTED_HEADERS)
    if header.cut:
      raise ValueError(
          f'the labels CSV header is over {MAX_HEADER_BYTES} bytes long (it starts '
          f'{_excerpt(header.text)}): is this the labels CSV? Its first line must be '
          '"image_name,tags" or "image_name,weather_labels,ground_labels"')
    text = header.text[3:] if header.text.startswith(b'\xef\xbb\xbf') else header.text
    fmt = detect_format(text)
  except BaseException:
    handle.close()
    raise

  def records() -> Iterator[tuple[int, bytes]]:
    try:
      yield from _records(reader)
      while handle.read(_READ_CHUNK_BYTES):   # what the records leave unread, for `digest`
        pass
    finally:
      handle.close()
  return fmt, records()


class _Digesting:
  """A binary file whose bytes read also update `digest`."""

  def __init__(self, handle: BinaryIO, digest):
    self._handle, self._digest, self.close = handle, digest, handle.close

  def read(self, size: int = -1) -> bytes:
    chunk = self._handle.read(size)
    self._digest.update(chunk)
    return chunk


def has_data_rows(path: str) -> bool:
  """Says whether a labels CSV holds at least one data record after its header.

  A file with only a header (or a header and blank lines) would run a job that does nothing, so
  callers refuse it before the job starts. Any non-blank record counts, good or not: a bad one is
  refused by the job with a reason, like any other. Reads only up to the first record.

  Raises:
    ValueError: the header is not a labels header.
    FileNotFoundError / OSError: the file cannot be read.
  """
  _, records = read_label_lines(path)
  try:
    return next(records, None) is not None
  finally:
    records.close()


def parse_label_file(path: str) -> tuple[dict[str, LabelRow], list[tuple[int, InputRefused]]]:
  """Reads a whole labels file: the good rows by image name, and the refused records.

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
