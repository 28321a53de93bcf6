"""A REST request body read as TF Serving reads it: rapidjson's rules and messages, in Python.

TF Serving parses a body with rapidjson (`ParseJson` in tensorflow_serving/util/json_tensor.cc,
flags `kParseNanAndInfFlag`), so the local server reads by its rules: `NaN`, `Infinity` and
`-Infinity` are numbers; bytes after the document are refused ("The document root must not be
followed by other values.") unless a NUL byte ends the document first (rapidjson's stream reads a
NUL as the end); strings are not checked for UTF-8 (their bytes reach a string tensor as sent); of
two members with the same name the first is found (`FindMember`); errors read "JSON Parse error:
<rapidjson's message> at offset: N". The fast path is orjson (with `rest_arrays` for big numeric
arrays); anything orjson refuses is read again by Python's json, whose errors are worded as
rapidjson's.

One deliberate difference: a member the server never reads (anything but `signature_name`,
`instances`, `inputs`) nested deeper than Python's parser goes (about 1,000 levels) is checked for
balanced brackets only; rapidjson parses it whole (recursively: deep enough, it overflows its stack).

Usage:
  doc = read_request(body)           # a dict, or a Refusal with TF Serving's message
"""
import json
import re

import grpc
import orjson

from model.serving.refusal import Refusal
from model.serving.rest_arrays import loads as loads_with_numeric_spans

__all__ = ['READ_KEYS', 'RequestDoc', 'read_request']

# The members of a predict body that json_tensor.cc reads.
READ_KEYS = ('signature_name', 'instances', 'inputs')
_DUPLICATE_HINTS = tuple(f'"{key}"'.encode() for key in READ_KEYS)
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_WHITESPACE = ' \t\r\n'
# Python's json messages -> rapidjson's (rapidjson/error/en.h, GetParseError_En).
_MESSAGES = {
    'Expecting value': 'Invalid value.',
    'Extra data': 'The document root must not be followed by other values.',
    "Expecting ':' delimiter": 'Missing a colon after a name of object member.',
    'Expecting property name enclosed in double quotes': 'Missing a name for object member.',
    'Unterminated string starting at': 'Missing a closing quotation mark in string.',
    'Invalid \\escape': 'Invalid escape character in string.',
    'Invalid \\uXXXX escape': 'Incorrect hex digit after \\u escape in string.',
    'Invalid control character at': 'Invalid encoding in string.',
}


class RequestDoc(dict):
  """The body's top-level object; `may_hold_bools` is False when no `true`/`false` is in it, so
  that numpy may read its lists whole (numpy reads `true` as 1, where TF Serving refuses it)."""
  may_hold_bools = True


def _invalid(message: str) -> Refusal:
  return Refusal(grpc.StatusCode.INVALID_ARGUMENT, message)


def _first_wins(pairs) -> dict:
  found = {}
  for key, value in pairs:
    found.setdefault(key, value)
  return found


def _innermost_open(text: str, position: int) -> str:
  """'[' or '{': the bracket still open at `position` (strings skipped)."""
  stack = []
  for token in _STRING_OR_BRACKET.finditer(text, 0, position):
    mark = token.group()
    if mark in '[{':
      stack.append(mark)
    elif mark in ']}' and stack:
      stack.pop()
  return stack[-1] if stack else '['


def _parse_error(error: json.JSONDecodeError) -> Refusal:
  if error.msg == "Expecting ',' delimiter":
    message = ("Missing a comma or ']' after an array element."
               if _innermost_open(error.doc, error.pos) == '[' else
               "Missing a comma or '}' after an object member.")
  else:
    message = _MESSAGES.get(error.msg, 'Invalid value.')
  return _invalid(f'JSON Parse error: {message} at offset: {error.pos}')


def _value_end(text: str, start: int) -> int:
  """Where the bracketed value at `start` ends (balanced brackets, strings skipped)."""
  depth = 0
  for token in _STRING_OR_BRACKET.finditer(text, start):
    mark = token.group()
    if mark in '[{':
      depth += 1
    elif mark in ']}':
      depth -= 1
      if depth == 0:
        return token.end()
  raise _invalid(f'JSON Parse error: Invalid value. at offset: {len(text)}')


def _read_deep(text: str) -> dict:
  """The top-level object member by member, when Python's parser cannot go as deep as the body."""
  decoder = json.JSONDecoder(object_pairs_hook=_first_wins)
  position = len(text) - len(text.lstrip(_WHITESPACE))
  if not text.startswith('{', position):
    raise _invalid('JSON Parse error: nested too deeply')
  doc, position = {}, position + 1
  while True:
    position += len(text[position:]) - len(text[position:].lstrip(_WHITESPACE))
    key, position = decoder.raw_decode(text, position)
    position = text.index(':', position) + 1
    position += len(text[position:]) - len(text[position:].lstrip(_WHITESPACE))
    if text[position] in '[{':
      end = _value_end(text, position)
      if key in READ_KEYS and key not in doc:
        try:
          doc[key] = decoder.decode(text[position:end])
        except RecursionError:
          raise _invalid(f"JSON Parse error: '{key}' is nested too deeply") from None
    else:
      value, end = decoder.raw_decode(text, position)
      doc.setdefault(key, value)
    position = end + len(text[end:]) - len(text[end:].lstrip(_WHITESPACE))
    if text[position] == '}':
      if text[position + 1:].strip(_WHITESPACE):
        raise _invalid('JSON Parse error: The document root must not be followed by other '
                       f'values. at offset: {position + 1}')
      return doc
    if text[position] != ',':
      raise _invalid("JSON Parse error: Missing a comma or '}' after an object member. at "
                     f'offset: {position}')
    position += 1


def _read_slowly(body: bytes):
  """Python's json, with rapidjson's leniencies: any bytes in strings, first member wins."""
  text = body.decode('utf-8', 'surrogateescape')
  try:
    return json.loads(text, object_pairs_hook=_first_wins)
  except json.JSONDecodeError as error:
    raise _parse_error(error) from None
  except RecursionError:
    try:
      return _read_deep(text)
    except (ValueError, IndexError) as error:   # a malformed member seen on the way
      if isinstance(error, json.JSONDecodeError):
        raise _parse_error(error) from None
      raise _invalid('JSON Parse error: Invalid value. at offset: 0') from None


def read_request(body: bytes) -> RequestDoc:
  """The JSON object of a request body (big arrays of numbers left as `NumericSpan`s), or TF
  Serving's INVALID_ARGUMENT `Refusal`."""
  body = body.split(b'\0', 1)[0]
  if not body.strip():
    raise _invalid('JSON Parse error: The document is empty')
  # orjson keeps the last of two members with one name: such a body is read the slow way.
  if any(body.count(hint) > 1 for hint in _DUPLICATE_HINTS):
    doc = _read_slowly(body)
  else:
    try:
      doc = loads_with_numeric_spans(body)
    except orjson.JSONDecodeError:   # NaN, Infinity, big integers, any bytes, deep nesting
      doc = _read_slowly(body)
  if not isinstance(doc, dict):
    text = json.dumps(doc)
    raise _invalid(f'JSON Value: {text[:200]} Is not object')
  request = RequestDoc(doc)
  request.may_hold_bools = b'true' in body or b'false' in body
  return request
