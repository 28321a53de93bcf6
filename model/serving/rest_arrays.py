"""Large numeric arrays in a REST body, read by numpy in one pass instead of as Python lists.

A predict body is mostly one big array of numbers (a 128 px chip is 49,152 of them); a JSON parser
makes a Python object of each, and the local server spent most of a call doing that. `loads`
parses the body with every large array of plain numbers left out as a `NumericSpan`, which
`array()` reads with numpy when it is rectangular. Anything else (a ragged list, a string, an
empty list, an integer of 19 digits or more) makes `array()` None, and the caller reads `value()` as
JSON and goes the checked way, with TF Serving's messages. One leniency: numbers JSON forbids but
C's strtod reads (`+1`, `01`, `1.`) pass inside such an array.

Usage:
  doc = loads(body)                       # NumericSpans where the big arrays were
  array = span.array()                    # int64 or float64, or None: use span.value()
"""
import re

import numpy as np
import orjson

__all__ = ['MIN_SPAN_BYTES', 'NumericSpan', 'loads']

# Smaller arrays are parsed as usual: below this the saving does not pay for the checks.
MIN_SPAN_BYTES = 1 << 16
_CANDIDATE = re.compile(rb'\[[\[\]0-9,.eE+\- \t\r\n]{%d,}' % MIN_SPAN_BYTES)
_WHITESPACE = b' \t\r\n'
_NUMBER_CHARS = b'0123456789.eE+-'
_PLACEHOLDER = '\x00numeric span '
_OPEN, _CLOSE = ord('['), ord(']')
_INT_LIMIT = 10 ** 18


def _skeleton(shape: list[int]) -> bytes:
  """The brackets and commas of a rectangular array of `shape` once its numbers are removed."""
  text = b'[' + b',' * (shape[-1] - 1) + b']'
  for size in reversed(shape[:-1]):
    text = b'[' + b','.join([text] * size) + b']'
  return text


class NumericSpan:
  """The text of a JSON array of numbers, not yet parsed."""

  def __init__(self, text: bytes):
    self.text = text
    self._array = self._read_array()

  def value(self):
    """Nested lists, as a JSON parser gives them."""
    return orjson.loads(self.text)

  def array(self) -> np.ndarray | None:
    """The numbers as an int64 or float64 array, when the text is a rectangular array; or None."""
    return self._array

  def _read_array(self) -> np.ndarray | None:
    compact = self.text.translate(None, _WHITESPACE)
    skeleton = compact.translate(None, _NUMBER_CHARS)
    numbers = compact.translate(None, b'[]')
    if b'[]' in skeleton or not numbers:
      return None
    marks = np.frombuffer(skeleton, np.uint8)
    opens = marks == _OPEN
    depth = np.cumsum(opens.astype(np.int64) - (marks == _CLOSE))
    lists_per_depth = np.bincount(depth[opens] - 1)
    if lists_per_depth[0] != 1 or np.any(lists_per_depth[1:] % lists_per_depth[:-1]):
      return None
    shape = (lists_per_depth[1:] // lists_per_depth[:-1]).tolist()
    is_float = any(c in numbers for c in b'.eE')
    try:
      values = np.fromstring(numbers, dtype=np.float64 if is_float else np.int64, sep=',')
    except ValueError:
      return None
    # numpy stops (with a warning, not an error) at text it cannot read: every number must be
    # there. C's strtoll stops at the int64 limits: a number near them may be past them.
    if (values.size != numbers.count(b',') + 1 or values.size % lists_per_depth[-1] or
        not is_float and (values.max() >= _INT_LIMIT or values.min() <= -_INT_LIMIT)):
      return None
    shape.append(values.size // int(lists_per_depth[-1]))
    if shape[-1] == 0 or skeleton != _skeleton(shape):
      return None
    return values.reshape(shape)


def _closing_bracket(text: bytes) -> int | None:
  """The index of the bracket that closes `text`'s first one, or None."""
  marks = np.frombuffer(text, np.uint8)
  depth = np.cumsum((marks == _OPEN).astype(np.int64) - (marks == _CLOSE))
  closed = np.flatnonzero(depth == 0)
  return int(closed[0]) if closed.size else None


def _restore(value, spans: list[NumericSpan]):
  if isinstance(value, dict):
    return {key: _restore(item, spans) for key, item in value.items()}
  if isinstance(value, list):
    return [_restore(item, spans) for item in value]
  if isinstance(value, str) and value.startswith(_PLACEHOLDER):
    index = value[len(_PLACEHOLDER):]
    if index.isdigit() and int(index) < len(spans):
      return spans[int(index)]
  return value


def loads(body: bytes):
  """The JSON document, with each large array of numbers as a NumericSpan.

  Raises:
    orjson.JSONDecodeError: the body, or an array of numbers in it, is not JSON as orjson reads it.
  """
  pieces, spans, position = [], [], 0
  for found in _CANDIDATE.finditer(body):
    if found.start() < position:
      continue
    end = _closing_bracket(found.group())
    if end is None:
      continue
    pieces += [body[position:found.start()],
               orjson.dumps(f'{_PLACEHOLDER}{len(spans)}')]
    span = NumericSpan(found.group()[:end + 1])
    if span.array() is None:
      span.value()   # not JSON: raise here, where the caller reads the whole body's error
    spans.append(span)
    position = found.start() + end + 1
  if not spans:
    return orjson.loads(body)
  pieces.append(body[position:])
  try:
    return _restore(orjson.loads(b''.join(pieces)), spans)
  except orjson.JSONDecodeError:   # a span cut out of a string, say: parse it all as it is
    return orjson.loads(body)
