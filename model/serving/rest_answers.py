"""A predict answer written as TF Serving writes it: `MakeJsonFromTensors` of json_tensor.cc.

The row format (`{"predictions": [...]}`: one item per example, an object of named outputs when
there are several) or the columnar format (`{"outputs": ...}`). Floats are written by TF Serving's
`WriteDecimal`: six significant digits (`absl::StrCat`, printf's `%g`: `9e+06`, `3e-05`) when they
read back as the same value, else `%.9g` (`%.17g` for double); `.0` added to a whole number
written without an exponent; `NaN`, `Infinity`, `-Infinity`, whatever else the answer holds. A
string output is written byte for byte (rapidjson does not check UTF-8); one whose name ends in
`_bytes` as `{"b64": "..."}`. A tensor of a type TF Serving cannot write (complex64, half, ...) is
INVALID_ARGUMENT "Failed to write JSON value for tensor type: <type>".

Usage:
  body = write_answer({'weather': weather, 'ground': ground}, row_format=False)
"""
import base64
import re

import grpc
import numpy as np
import orjson
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from model.serving.refusal import Refusal

__all__ = ['data_type_string', 'decimal_texts', 'write_answer']

_BYTES_SUFFIX = '_bytes'
# AddSingleValueAndAdvance writes these; any other type is refused.
_WRITTEN = {types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_INT32, types_pb2.DT_INT16,
            types_pb2.DT_INT8, types_pb2.DT_UINT8, types_pb2.DT_STRING, types_pb2.DT_INT64,
            types_pb2.DT_BOOL, types_pb2.DT_UINT32, types_pb2.DT_UINT64}
# rapidjson's Writer::String escapes: the quote, the backslash and control characters.
_ESCAPED = re.compile(rb'[\x00-\x1f"\\]')
_SHORT_ESCAPES = {0x22: b'\\"', 0x5c: b'\\\\', 0x08: b'\\b', 0x0c: b'\\f', 0x0a: b'\\n',
                  0x0d: b'\\r', 0x09: b'\\t'}


def _invalid(message: str) -> Refusal:
  return Refusal(grpc.StatusCode.INVALID_ARGUMENT, message)


def data_type_string(dtype: int) -> str:
  """TF's DataTypeString: DT_FLOAT -> 'float', DT_HALF -> 'half', DT_COMPLEX64 -> 'complex64'."""
  return types_pb2.DataType.Name(dtype)[len('DT_'):].lower()


def decimal_texts(array: np.ndarray) -> np.ndarray:
  """WriteDecimal's text of each float of `array` (float32 or float64), as a str array."""
  flat = array.ravel()
  wide = flat.astype(np.float64)
  finite = np.isfinite(flat)
  with np.errstate(all='ignore'):
    texts = np.char.mod('%g', wide).astype(object)
    misread = finite & (np.char.mod('%g', wide).astype(flat.dtype) != flat)
  if misread.any():
    texts[misread] = np.char.mod('%.9g' if flat.dtype == np.float32 else '%.17g', wide[misread])
  # A whole number without an exponent gets '.0', so that a list never mixes 1 and 1.5.
  plain = np.array([('.' not in t and 'e' not in t) for t in texts], dtype=bool) & finite
  texts[plain] = [t + '.0' for t in texts[plain]]
  texts[np.isnan(flat)] = 'NaN'
  texts[np.isposinf(flat)] = 'Infinity'
  texts[np.isneginf(flat)] = '-Infinity'
  return texts.reshape(array.shape)


def _string_text(value: bytes) -> bytes:
  escaped = _ESCAPED.sub(lambda found: _SHORT_ESCAPES.get(
      found.group()[0], b'\\u%04X' % found.group()[0]), value)
  return b'"' + escaped + b'"'


def _cells(name: str, array: np.ndarray, dtype: int) -> np.ndarray:
  """Each value's JSON text (bytes), in the tensor's shape."""
  if dtype in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE):
    texts = [t.encode() for t in decimal_texts(array).ravel()]
  elif dtype == types_pb2.DT_STRING:
    values = [v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()]
    texts = ([b'{"b64":"' + base64.b64encode(v) + b'"}' for v in values]
             if name.endswith(_BYTES_SUFFIX) else [_string_text(v) for v in values])
  else:
    texts = [orjson.dumps(v) for v in array.ravel().tolist()]
  cells = np.empty(len(texts), dtype=object)
  cells[:] = texts
  return cells.reshape(array.shape)


def _nested_text(cells: np.ndarray | bytes) -> bytes:
  """AddTensorValues: nested arrays of the cells (a scalar alone)."""
  if isinstance(cells, bytes):   # a row of a 1-D tensor
    return cells
  if cells.ndim == 0:
    return cells.item()
  if cells.ndim == 1:
    return b'[' + b','.join(cells.tolist()) + b']'
  return b'[' + b','.join(_nested_text(part) for part in cells) + b']'


def _data_type(array: np.ndarray) -> int:
  if array.dtype.kind in 'OSU':
    return types_pb2.DT_STRING
  return tf.dtypes.as_dtype(array.dtype).as_datatype_enum


def write_answer(outputs: dict[str, np.ndarray], row_format: bool) -> bytes:
  """The answer body: `{"predictions": [...]}` (row format) or `{"outputs": ...}` (columnar)."""
  if not outputs:
    raise _invalid('Cannot convert empty tensor map to JSON')
  names = sorted(outputs)
  cells = {}
  for name in names:
    dtype = _data_type(outputs[name])
    if dtype not in _WRITTEN:
      raise _invalid(f'Failed to write JSON value for tensor type: {data_type_string(dtype)}')
    cells[name] = _cells(name, outputs[name], dtype)
  if not row_format:
    values = {name: orjson.Fragment(_nested_text(cells[name])) for name in names}
    return orjson.dumps({'outputs': values if len(names) > 1 else values[names[0]]})
  batch = None
  for name in names:
    if cells[name].ndim == 0:
      raise _invalid(f'Tensor name: {name} has no shape information ')
    if batch is not None and cells[name].shape[0] != batch:
      raise _invalid(f'Tensor name: {name} has inconsistent batch size: '
                     f'{cells[name].shape[0]} expecting: {batch}')
    batch = cells[name].shape[0]
  rows = [{name: orjson.Fragment(_nested_text(cells[name][i])) for name in names}
          for i in range(batch)]
  return orjson.dumps({'predictions': rows if len(names) > 1 else
                       [row[names[0]] for row in rows]})
