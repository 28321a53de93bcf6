"""TF Serving's JSON tensors: a predict body's `instances` / `inputs` to arrays, outputs to answers.

What tensorflow_serving/util/json_tensor.cc does, with its messages: the row format (`instances`:
a list with one item per example, each a value or an object of named inputs, stacked along a new
first dimension) answered as `predictions` (one item per example, an object of named outputs when
there are several); the columnar format (`inputs`: the whole tensor, or an object of them)
answered as `outputs`. A string tensor's value may be `{"b64": "..."}`, and an output whose name
ends in `_bytes` is written that way. Floats are written as the shortest text that reads back as
the same float32, as TF Serving's `WriteDecimal` does.

Three deliberate differences: a number out of range of an integer input (300 for uint8) is refused
where TF Serving wraps it; a value quoted in a message is cut at 200 characters (TF Serving quotes
a whole image); tensors nested deeper than 64 levels are refused.

Usage:
  doc = read_request(body)
  arrays, row_format = read_inputs(doc, signature_def.inputs)
  answer = write_answer({'weather': weather, 'ground': ground}, row_format)
"""
import base64
import binascii
import json

import grpc
import numpy as np
import orjson
from tensorflow.core.framework import types_pb2

from model.serving.refusal import Refusal
from model.serving.rest_arrays import NumericSpan
from model.serving.rest_arrays import loads as loads_with_numeric_spans

__all__ = ['columnar_request', 'read_float_outputs', 'read_inputs', 'read_request',
           'signature_name', 'write_answer']

_B64 = 'b64'
_BYTES_SUFFIX = '_bytes'
_QUOTED_CHARS = 200
_MAX_RANK = 64
# DataType -> (TF's name for it, numpy dtype); the types TF Serving's JSON reader converts.
_DTYPES = {
    types_pb2.DT_FLOAT: ('float', np.float32),
    types_pb2.DT_DOUBLE: ('double', np.float64),
    types_pb2.DT_INT32: ('int32', np.int32),
    types_pb2.DT_INT16: ('int16', np.int16),
    types_pb2.DT_INT8: ('int8', np.int8),
    types_pb2.DT_UINT8: ('uint8', np.uint8),
    types_pb2.DT_INT64: ('int64', np.int64),
    types_pb2.DT_UINT32: ('uint32', np.uint32),
    types_pb2.DT_UINT64: ('uint64', np.uint64),
    types_pb2.DT_BOOL: ('bool', np.bool_),
    types_pb2.DT_STRING: ('string', object),
}


def _invalid(message: str) -> Refusal:
  return Refusal(grpc.StatusCode.INVALID_ARGUMENT, message)


def _quoted(value) -> str:
  text = json.dumps(value, separators=(',', ':'), default=lambda span: span.value())
  return text if len(text) <= _QUOTED_CHARS else text[:_QUOTED_CHARS] + '...'


def _json_type(value) -> str:
  if value is None or isinstance(value, bool):
    return {None: 'Null', False: 'False', True: 'True'}[value]
  return {dict: 'Object', list: 'Array', str: 'String'}.get(type(value), 'Number')


def _is_b64(value) -> bool:
  return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(_B64), str)


def _shape_text(shape) -> str:
  return '[' + ','.join(str(d) for d in shape) + ']'


# ---------------------------------------------------------------------------------------------
# Request bodies.

def read_request(body: bytes) -> dict:
  """The JSON object of a request body (big arrays of numbers left as `NumericSpan`s), or TF
  Serving's INVALID_ARGUMENT `Refusal`."""
  if not body.strip():
    raise _invalid('JSON Parse error: The document is empty')
  try:
    doc = loads_with_numeric_spans(body)
  except orjson.JSONDecodeError:
    try:  # NaN, Infinity and integers over 64 bits are valid for TF Serving's parser too
      doc = json.loads(body)
    except json.JSONDecodeError as error:
      raise _invalid(f'JSON Parse error: {error.msg} at offset: {error.pos}') from None
    except UnicodeDecodeError as error:
      raise _invalid('JSON Parse error: Invalid encoding in string. at offset: '
                     f'{error.start}') from None
    except RecursionError:
      raise _invalid('JSON Parse error: nested too deeply') from None
  if not isinstance(doc, dict):
    raise _invalid(f'JSON Value: {_quoted(doc)} Is not object')
  return doc


def signature_name(doc: dict) -> str:
  """The request's `signature_name` ('' when absent: the default signature)."""
  value = doc.get('signature_name', '')
  if not isinstance(value, str):
    raise _invalid(f"JSON Value: {_quoted(doc)} not formatted correctly. 'signature_name' key "
                   'must be a string value.')
  return value


def _scalar(value, dtype_name: str, np_dtype):
  """One JSON value as a value of the tensor's type, or TF Serving's refusal of it."""
  if np_dtype is object:
    if isinstance(value, str):
      return value.encode()
    if isinstance(value, dict):
      if not _is_b64(value):
        raise _invalid(f'JSON Value: {_quoted(value)} not formatted correctly for base64 data')
      try:
        return base64.b64decode(value[_B64], validate=True)
      except (binascii.Error, ValueError):
        raise _invalid('Unable to base64 decode') from None
  else:
    kind = np.dtype(np_dtype).kind
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == 'f' and is_number:
      info = np.finfo(np_dtype)
      lossless = (abs(value) < 2 ** (info.nmant + 1) if isinstance(value, int)
                  else not np.isfinite(value) or abs(value) <= info.max)
      if not lossless:
        raise _invalid(f'Cannot convert JSON value: {_quoted(value)} to {dtype_name} without '
                       'loss of precision.')
      return value
    if kind in 'iu' and is_number and isinstance(value, int):
      info = np.iinfo(np_dtype)
      if info.min <= value <= info.max:
        return value
    if kind == 'b' and isinstance(value, bool):
      return value
  raise _invalid(f'JSON Value: {_quoted(value)} Type: {_json_type(value)} is not of expected '
                 f'type: {dtype_name}')


def _checked_walk(value, dtype_name: str, np_dtype) -> np.ndarray:
  """FillTensorProto: every leaf at the same depth, every list as long as the first at its level."""
  shape = []
  first = value
  while isinstance(first, list) and len(shape) <= _MAX_RANK:
    shape.append(len(first))
    if not first:
      break
    first = first[0]
  if len(shape) > _MAX_RANK:
    raise _invalid(f'JSON Value nested more than {_MAX_RANK} levels deep')
  flat = []

  def fill(item, level: int) -> None:
    if not isinstance(item, list):
      if level != len(shape):
        raise _invalid(f'JSON Value: {_quoted(item)} found at incorrect level: {level + 1} in the '
                       f'JSON DOM. Expected at level: {len(shape)}')
      flat.append(_scalar(item, dtype_name, np_dtype))
      return
    if level >= len(shape):
      raise _invalid(f'Encountered list at unexpected level: {level} expected < {len(shape)}')
    if len(item) != shape[level]:
      raise _invalid(f'Encountered list at unexpected size: {len(item)} at level: {level} '
                     f'expected size: {shape[level]}')
    for element in item:
      fill(element, level + 1)

  fill(value, 0)
  array = np.empty(len(flat), dtype=np_dtype)
  array[:] = flat
  return array.reshape(shape)


def _fast_array(value, np_dtype) -> np.ndarray | None:
  """A well-formed numeric tensor in one numpy call; None sends it to the checked walk.

  A bool among numbers becomes 0 or 1 here (numpy's rule) where TF Serving refuses it.
  """
  if np_dtype is object:
    return None
  try:
    array = np.asarray(value)
  except (ValueError, TypeError, OverflowError):   # ragged, or not numbers
    return None
  kind, target = array.dtype.kind, np.dtype(np_dtype)
  if array.size == 0:
    fits = kind in 'iufb'
  elif target.kind == 'b':
    fits = kind == 'b'
  elif target.kind in 'iu':
    info = np.iinfo(target)
    fits = kind in 'iu' and info.min <= array.min() and array.max() <= info.max
  elif kind in 'iu':
    fits = np.abs(array).max() < 2 ** (np.finfo(target).nmant + 1)
  elif kind == 'f':
    finite = array[np.isfinite(array)]
    fits = finite.size == 0 or np.abs(finite).max() <= np.finfo(target).max
  else:
    fits = False
  return array.astype(target, copy=False) if fits else None


def _tensor(value, info) -> np.ndarray:
  """One input's JSON value as an array of the signature's dtype."""
  if info.dtype not in _DTYPES:
    raise Refusal(grpc.StatusCode.UNIMPLEMENTED, f'Conversion of JSON Value: {_quoted(value)} to '
                  f'type: {types_pb2.DataType.Name(info.dtype)}')
  dtype_name, np_dtype = _DTYPES[info.dtype]
  if isinstance(value, NumericSpan):
    array = value.array()
    array = None if array is None else _fast_array(array, np_dtype)
    if array is not None:
      return array
    value = value.value()
  array = _fast_array(value, np_dtype)
  return array if array is not None else _checked_walk(value, dtype_name, np_dtype)


def _read_rows(instances, infos) -> dict[str, np.ndarray]:
  """The row format: one item per example, stacked (FillTensorMapFromInstancesList)."""
  names = sorted(infos)
  if isinstance(instances, NumericSpan):   # a list of plain items, read whole
    array = instances.array()
    if array is not None and len(names) == 1 and infos[names[0]].dtype in _DTYPES:
      array = _fast_array(array, _DTYPES[infos[names[0]].dtype][1])
      if array is not None:
        return {names[0]: array}
    instances = instances.value()
  if not isinstance(instances[0], dict) and len(names) > 1:
    raise _invalid('instances is a plain list, but expecting list of objects as multiple input '
                   'tensors required as per tensorinfo_map')
  objects = not _is_b64(instances[0]) and isinstance(instances[0], dict)
  columns: dict[str, list[np.ndarray]] = {}

  def add(name: str, value, where: str) -> None:
    try:
      if name not in infos:
        raise _invalid(f'JSON object: does not have named input: {name}')
      array = _tensor(value, infos[name])
      if name in columns and columns[name][0].shape != array.shape:
        first = columns[name][0]
        raise _invalid(f'Expecting tensor size: {first.size} but got: {array.size}'
                       if first.size != array.size else
                       f'Expecting shape {_shape_text(first.shape)} but got: '
                       f'{_shape_text(array.shape)}')
    except Refusal as refusal:
      raise _invalid(f"Failed to process element: {where} of 'instances' list. Error: "
                     f'{refusal.code.name}: {refusal.message}') from None
    columns.setdefault(name, []).append(array)

  for index, element in enumerate(instances):
    is_object = isinstance(element, dict) and not _is_b64(element)
    if objects:
      if not is_object:
        raise _invalid(f'Expecting object but got list at item {index} of input list')
      for name, value in element.items():
        add(name, value, f'{index} key: {name}')
      if set(element) != set(names):
        raise _invalid(f"Failed to process element: {index} of 'instances' list. JSON object: "
                       f"{_quoted(element)} keys must be equal to: {','.join(names)}")
    else:
      if is_object:
        raise _invalid(f'Expecting value/list but got object at item {index} of input list')
      add(names[0], element, str(index))
  return {name: np.stack(arrays) for name, arrays in columns.items()}


def _read_columns(inputs, infos) -> dict[str, np.ndarray]:
  """The columnar format: each input whole (FillTensorMapFromInputsMap)."""
  if not isinstance(inputs, dict) or _is_b64(inputs):
    if len(infos) > 1:
      raise _invalid('inputs is a plain value/list, but expecting an object as multiple input '
                     'tensors required as per tensorinfo_map')
    (name,) = infos
    return {name: _tensor(inputs, infos[name])}
  arrays = {}
  for name in sorted(infos):
    if name not in inputs:
      raise _invalid(f"Missing named input: {name} in 'inputs' object.")
    arrays[name] = _tensor(inputs[name], infos[name])
  return arrays


def read_inputs(doc: dict, infos) -> tuple[dict[str, np.ndarray], bool]:
  """(input alias -> array, whether the request used the row format) for a signature's inputs.

  Args:
    doc: the request (`read_request`).
    infos: the signature's inputs, alias -> TensorInfo.

  Raises:
    Refusal: INVALID_ARGUMENT with TF Serving's message for what is wrong.
  """
  if not infos:
    raise _invalid(f'Failed to get input map for signature: {signature_name(doc) or "DEFAULT"}')
  if 'instances' in doc and 'inputs' in doc:
    raise _invalid(f"JSON Value: {_quoted(doc)} Not formatted correctly expecting only one of "
                   "'inputs' or 'instances' keys to exist ")
  if 'instances' in doc:
    instances = doc['instances']
    if not isinstance(instances, (list, NumericSpan)):
      raise _invalid(f"JSON Value: {_quoted(doc)} Excepting 'instances' to be an list/array")
    if not instances:
      raise _invalid(f"JSON Value: {_quoted(doc)} No values in 'instances' array")
    return _read_rows(instances, infos), True
  if 'inputs' in doc:
    return _read_columns(doc['inputs'], infos), False
  raise _invalid("Missing 'inputs' or 'instances' key")


# ---------------------------------------------------------------------------------------------
# Answers.

def _string_values(name: str, array: np.ndarray):
  """A string tensor as nested lists: text, or {"b64": ...} for an output named *_bytes."""
  def one(value: bytes):
    if name.endswith(_BYTES_SUFFIX):
      return {_B64: base64.b64encode(value).decode()}
    return value.decode('utf-8', 'replace')
  strings = np.empty(array.size, dtype=object)
  strings[:] = [one(v) for v in array.ravel()]
  return strings.reshape(array.shape).tolist()


def write_answer(outputs: dict[str, np.ndarray], row_format: bool) -> bytes:
  """The answer body: `{"predictions": [...]}` (row format) or `{"outputs": ...}` (columnar)."""
  if not outputs:
    raise _invalid('Cannot convert empty tensor map to JSON')
  names = sorted(outputs)
  plain = all(outputs[n].dtype.kind != 'f' or np.isfinite(outputs[n]).all() for n in names)
  values = {}
  for name in names:
    array = outputs[name]
    if array.dtype.kind in 'OSU':
      values[name] = _string_values(name, array)
    else:   # orjson writes float32 as the shortest text that reads back the same; NaN needs json
      values[name] = np.ascontiguousarray(array) if plain else array.tolist()
  if row_format:
    batch = None
    for name in names:
      if outputs[name].ndim == 0:
        raise _invalid(f'Tensor name: {name} has no shape information ')
      if batch is not None and outputs[name].shape[0] != batch:
        raise _invalid(f'Tensor name: {name} has inconsistent batch size: '
                       f'{outputs[name].shape[0]} expecting: {batch}')
      batch = outputs[name].shape[0]
    rows = [{name: values[name][i] for name in names} if len(names) > 1 else values[names[0]][i]
            for i in range(batch)]
    answer = {'predictions': rows}
  else:
    answer = {'outputs': values if len(names) > 1 else values[names[0]]}
  if plain:
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
  return json.dumps(answer).encode()   # NaN, Infinity, -Infinity, as TF Serving writes them


# ---------------------------------------------------------------------------------------------
# The client's side.

def columnar_request(inputs: dict[str, np.ndarray], signature: str) -> bytes:
  """A predict body in the columnar format: `{"signature_name": ..., "inputs": {alias: tensor}}`."""
  return orjson.dumps({'signature_name': signature,
                       'inputs': {k: np.ascontiguousarray(v) for k, v in inputs.items()}},
                      option=orjson.OPT_SERIALIZE_NUMPY)


def read_float_outputs(body: bytes, names) -> dict[str, np.ndarray]:
  """float32 arrays of the named outputs of a columnar answer (`{"outputs": {name: ...}}`).

  Raises:
    ValueError: the body is not such an answer.
  """
  try:
    outputs = json.loads(body)['outputs'] if b'NaN' in body or b'Infinity' in body else (
        orjson.loads(body)['outputs'])
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(f'not a columnar predict answer ({type(error).__name__}: {error}): '
                     f'{body[:200]!r}') from None
  if not isinstance(outputs, dict) or not set(names) <= set(outputs):
    found = sorted(outputs) if isinstance(outputs, dict) else 'one, unnamed'
    raise ValueError(f'the answer has outputs {found}; expected {sorted(names)}')
  try:
    return {name: np.asarray(outputs[name], dtype=np.float32) for name in names}
  except (ValueError, TypeError) as error:
    raise ValueError(f'an output is not a numeric tensor: {error}') from None
