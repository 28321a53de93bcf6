"""TF Serving's JSON tensors: a predict body's `instances` / `inputs` read into arrays.

What `FillPredictRequestFromJson` of tensorflow_serving/util/json_tensor.cc does, with its
messages: the row format (`instances`: a list with one item per example, each a value or an object
of named inputs, stacked along a new first dimension) or the columnar format (`inputs`: the whole
tensor, or an object of them). A string tensor's value may be `{"b64": "..."}`. Any JSON number
goes into a float or double tensor (an integer of 2^24 or more, as TF Serving has since 2.5.1;
`1.79769e+308` becomes `inf` in a float, as `GetFloat()` casts it); `true` and `false` only into
a bool one. The body is read by `rest_json`, answers are written by `rest_answers`.

Three deliberate differences: a number out of range of an integer input (300 for uint8) is refused
where TF Serving wraps it (a batch job must not predict a different image than it sent); a value
quoted in a message is cut at 200 characters (TF Serving quotes a whole image); tensors nested
deeper than 64 levels are refused (TF has at most 64 dimensions anyway).

Usage:
  doc = rest_json.read_request(body)
  arrays, row_format = read_inputs(doc, signature_def.inputs)
"""
import base64
import binascii
import json

import grpc
import numpy as np
import orjson
from tensorflow.core.framework import types_pb2

from model.serving.refusal import Refusal
from model.serving.rest_answers import data_type_string
from model.serving.rest_arrays import NumericSpan

__all__ = ['columnar_request', 'read_float_outputs', 'read_inputs', 'signature_name']

_B64 = 'b64'
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
# Request bodies (read by rest_json).

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
    if isinstance(value, str):   # bytes that are not UTF-8 arrive as sent (rest_json)
      return value.encode('utf-8', 'surrogateescape')
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
      try:
        return float(value)   # cast to the tensor's type with the others: inf where too big
      except OverflowError:   # an integer beyond any double: rapidjson cannot read it either
        raise _invalid('JSON Parse error: Number too big to be stored in double.') from None
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
  if np_dtype is object:
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
  else:
    with np.errstate(over='ignore'):   # a double beyond float's range is inf, as in TF
      array = np.array(flat, dtype=np.float64 if np.dtype(np_dtype).kind == 'f' else np_dtype)
      array = array.astype(np_dtype)
  return array.reshape(shape)


def _fast_array(value, np_dtype, may_hold_bools: bool) -> np.ndarray | None:
  """A well-formed numeric tensor in one numpy call; None sends it to the checked walk.

  numpy reads a bool among numbers as 0 or 1 where TF Serving refuses it, so lists from a body
  that may hold `true` or `false` take the checked walk (big arrays come as `NumericSpan`s,
  which hold only numbers).
  """
  if np_dtype is object or (may_hold_bools and not isinstance(value, np.ndarray)):
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
  else:   # any number into a float tensor; beyond its range, inf
    fits = kind in 'iuf'
  if not fits:
    return None
  with np.errstate(over='ignore'):
    return array.astype(target, copy=False)


def _tensor(value, info, may_hold_bools: bool = True) -> np.ndarray:
  """One input's JSON value as an array of the signature's dtype."""
  if info.dtype not in _DTYPES:
    raise Refusal(grpc.StatusCode.UNIMPLEMENTED, f'Conversion of JSON Value: {_quoted(value)} to '
                  f'type: {data_type_string(info.dtype)}')
  dtype_name, np_dtype = _DTYPES[info.dtype]
  if isinstance(value, NumericSpan):
    array = value.array()
    array = None if array is None else _fast_array(array, np_dtype, False)
    if array is not None:
      return array
    value = value.value()
  array = _fast_array(value, np_dtype, may_hold_bools)
  return array if array is not None else _checked_walk(value, dtype_name, np_dtype)


def _read_rows(instances, infos, may_hold_bools: bool) -> dict[str, np.ndarray]:
  """The row format: one item per example, stacked (FillTensorMapFromInstancesList)."""
  names = sorted(infos)
  if isinstance(instances, NumericSpan):   # a list of plain items, read whole
    array = instances.array()
    if array is not None and len(names) == 1 and infos[names[0]].dtype in _DTYPES:
      array = _fast_array(array, _DTYPES[infos[names[0]].dtype][1], False)
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
      array = _tensor(value, infos[name], may_hold_bools)
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


def _read_columns(inputs, infos, may_hold_bools: bool) -> dict[str, np.ndarray]:
  """The columnar format: each input whole (FillTensorMapFromInputsMap)."""
  if not isinstance(inputs, dict) or _is_b64(inputs):
    if len(infos) > 1:
      raise _invalid('inputs is a plain value/list, but expecting an object as multiple input '
                     'tensors required as per tensorinfo_map')
    (name,) = infos
    return {name: _tensor(inputs, infos[name], may_hold_bools)}
  arrays = {}
  for name in sorted(infos):
    if name not in inputs:
      raise _invalid(f"Missing named input: {name} in 'inputs' object.")
    arrays[name] = _tensor(inputs[name], infos[name], may_hold_bools)
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
  may_hold_bools = getattr(doc, 'may_hold_bools', True)
  if 'instances' in doc and 'inputs' in doc:
    raise _invalid(f"JSON Value: {_quoted(doc)} Not formatted correctly expecting only one of "
                   "'inputs' or 'instances' keys to exist ")
  if 'instances' in doc:
    instances = doc['instances']
    if not isinstance(instances, (list, NumericSpan)):
      raise _invalid(f"JSON Value: {_quoted(doc)} Excepting 'instances' to be an list/array")
    if not instances:
      raise _invalid(f"JSON Value: {_quoted(doc)} No values in 'instances' array")
    return _read_rows(instances, infos, may_hold_bools), True
  if 'inputs' in doc:
    return _read_columns(doc['inputs'], infos, may_hold_bools), False
  raise _invalid("Missing 'inputs' or 'instances' key")


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
    try:
      answer = orjson.loads(body)
    except orjson.JSONDecodeError:   # NaN, Infinity, -Infinity: TF Serving's non-finite floats
      answer = json.loads(body)
    outputs = answer['outputs']
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(f'not a columnar predict answer ({type(error).__name__}: {error}): '
                     f'{body[:200]!r}') from None
  if not isinstance(outputs, dict) or not set(names) <= set(outputs):
    found = sorted(outputs) if isinstance(outputs, dict) else 'one, unnamed'
    raise ValueError(f'the answer has outputs {found}; expected {sorted(names)}')
  try:
    with np.errstate(over='ignore'):   # a double past float's range, as a float32 reads it
      return {name: np.asarray(outputs[name], dtype=np.float32) for name in names}
  except (ValueError, TypeError) as error:
    raise ValueError(f'an output is not a numeric tensor: {error}') from None
