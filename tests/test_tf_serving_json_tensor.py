"""TF Serving's own json_tensor_test.cc, ported: the local server reads and writes JSON tensors so.

Each TEST of tensorflow_serving/util/json_tensor_test.cc is a case here, with its inputs, expected
tensors or JSON and message words carried over; the reader is `rest_json` + `rest_tensors` and the
writer `rest_answers`, as the local server's REST API calls them. Where TF Serving changed since
that test was written (integers of 2^24 and more into a float: accepted since 2.5.1; a double
beyond float's range: inf), the case expects what TF Serving does now. The classify and regress
cases are the documented difference of `test_classify_and_regress_cases_are_a_documented_difference`
(README: "Where the local server differs from TF Serving"). No TensorFlow model is needed.
"""
import json

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from model.serving.refusal import Refusal
from model.serving.rest_answers import write_answer
from model.serving.rest_json import read_request
from model.serving.rest_tensors import read_float_outputs, read_inputs, signature_name


def infos(**dtypes) -> dict:
  return {name: meta_graph_pb2.TensorInfo(dtype=tf.dtypes.as_dtype(dtype).as_datatype_enum)
          for name, dtype in dtypes.items()}


def tensor(text: str) -> np.ndarray:
  return tf.make_ndarray(text_format.Parse(text, tensor_pb2.TensorProto()))


def fill(body, **dtypes) -> tuple[dict, bool]:
  """FillPredictRequestFromJson: (input arrays, whether the row format was used)."""
  doc = read_request(body.encode() if isinstance(body, str) else body)
  signature_name(doc)
  return read_inputs(doc, infos(**dtypes))


def refusal(body, **dtypes) -> Refusal:
  with pytest.raises(Refusal) as raised:
    fill(body, **dtypes)
  return raised.value


def assert_tensor(got: np.ndarray, want: np.ndarray) -> None:
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_array_equal(got, want)


# --- Requests: FillPredictRequestFromJson -------------------------------------------------------

REQUESTS = {
    # TEST name: (body, input dtypes, row format?, {input: expected TensorProto text})
    'SingleUnnamedTensor': ('{"instances": [[1,2],[3,4],[5,6]]}', {'default': 'int32'}, True, {
        'default': 'dtype: DT_INT32 tensor_shape { dim { size: 3 } dim { size: 2 } } '
                   'int_val: [1, 2, 3, 4, 5, 6]'}),
    'MixedInputForFloatTensor': ('{"instances": [1, 2.0, 3, 4, 5.003, 0.007, 0.0]}',
                                 {'default': 'float32'}, True, {
        'default': 'dtype: DT_FLOAT tensor_shape { dim { size: 7 } } '
                   'float_val: [1, 2, 3, 4, 5.003, 0.007, 0]'}),
    'MixedInputForDoubleTensor': ('{"instances": [1.0, 2, 3, 4, 0.662, 0, 0.0]}',
                                  {'default': 'float64'}, True, {
        'default': 'dtype: DT_DOUBLE tensor_shape { dim { size: 7 } } '
                   'double_val: [1, 2, 3, 4, 0.662, 0, 0]'}),
    'SingleUnnamedTensorWithSignature': (
        '{"signature_name": "predict_images", "instances": [[1,2]]}', {'default': 'int32'}, True,
        {'default': 'dtype: DT_INT32 tensor_shape { dim { size: 1 } dim { size: 2 } } '
                    'int_val: [1, 2]'}),
    # The C++ test stops its buffer before an 'X'; rapidjson reads a NUL as the end just so.
    'TensorFromNonNullTerminatedBuffer': (b'{"instances": [[1,2],[3,4],[5,6]]}\0X',
                                          {'default': 'int32'}, True, {
        'default': 'dtype: DT_INT32 tensor_shape { dim { size: 3 } dim { size: 2 } } '
                   'int_val: [1, 2, 3, 4, 5, 6]'}),
    'SingleUnnamedTensorBase64Scalars': (
        '{"instances": [ { "b64" : "aGVsbG8=" }, { "b64": "d29ybGQ=" } ]}',
        {'default': 'string'}, True,
        {'default': 'dtype: DT_STRING tensor_shape { dim { size: 2 } } '
                    'string_val: ["hello", "world"]'}),
    'SingleUnnamedTensorBase64Lists': (
        '{"instances": [ [{ "b64" : "aGVsbG8=" }], [{ "b64": "d29ybGQ=" }] ]}',
        {'default': 'string'}, True,
        {'default': 'dtype: DT_STRING tensor_shape { dim { size: 2 } dim { size: 1 } } '
                    'string_val: ["hello", "world"]'}),
    'SingleNamedTensorBase64': (
        '{"instances": [{"default": [ [{ "b64" : "aGVsbG8=" }], [{ "b64": "d29ybGQ=" }] ]}]}',
        {'default': 'string'}, True,
        {'default': 'dtype: DT_STRING tensor_shape { dim { size: 1 } dim { size: 2 } '
                    'dim { size: 1 } } string_val: ["hello", "world"]'}),
    'MultipleNamedTensor': (
        '{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"], '
        '"float_tensor": [1.0, NaN], "dbl_tensor": [NaN]}, {"int_tensor": [[7,8],[9,0],[1,2]], '
        '"str_tensor": ["baz", "bat"], "float_tensor": [2.0, Infinity], "dbl_tensor": [2.0]}]}',
        {'int_tensor': 'int32', 'str_tensor': 'string', 'float_tensor': 'float32',
         'dbl_tensor': 'float64'}, True, {
            'int_tensor': 'dtype: DT_INT32 tensor_shape { dim { size: 2 } dim { size: 3 } '
                          'dim { size: 2 } } int_val: [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]',
            'str_tensor': 'dtype: DT_STRING tensor_shape { dim { size: 2 } dim { size: 2 } } '
                          'string_val: ["foo", "bar", "baz", "bat"]',
            'float_tensor': 'dtype: DT_FLOAT tensor_shape { dim { size: 2 } dim { size: 2 } } '
                            'float_val: [1, nan, 2, inf]',
            'dbl_tensor': 'dtype: DT_DOUBLE tensor_shape { dim { size: 2 } dim { size: 1 } } '
                          'double_val: [nan, 2]'}),
    'SingleUnnamedTensorColumnarFormat': (
        '{"inputs": {"int_tensor": [[[1,2],[3,4],[5,6]]]}}', {'int_tensor': 'int32'}, False, {
            'int_tensor': 'dtype: DT_INT32 tensor_shape { dim { size: 1 } dim { size: 3 } '
                          'dim { size: 2 } } int_val: [1, 2, 3, 4, 5, 6]'}),
    'SingleUnnamedTensorColumnarFormat (input not named)': (
        '{"inputs": [[[1,2],[3,4],[5,6]]]}', {'int_tensor': 'int32'}, False, {
            'int_tensor': 'dtype: DT_INT32 tensor_shape { dim { size: 1 } dim { size: 3 } '
                          'dim { size: 2 } } int_val: [1, 2, 3, 4, 5, 6]'}),
    'MultipleNamedTensorColumnarFormat': (
        '{"inputs": {"int_tensor": [[[1,2],[3,4],[5,6]]], "str_tensor": ["foo", "bar"], '
        '"bin_tensor": { "b64" : "aGVsbG8=" }}}',
        {'int_tensor': 'int32', 'str_tensor': 'string', 'bin_tensor': 'string'}, False, {
            'int_tensor': 'dtype: DT_INT32 tensor_shape { dim { size: 1 } dim { size: 3 } '
                          'dim { size: 2 } } int_val: [1, 2, 3, 4, 5, 6]',
            'str_tensor': 'dtype: DT_STRING tensor_shape { dim { size: 2 } } '
                          'string_val: ["foo", "bar"]',
            'bin_tensor': 'dtype: DT_STRING tensor_shape {} string_val: "hello"'}),
    # SingleUnnamedTensorErrors' last three, as TF Serving answers them since 2.5.1 (the
    # "without loss of precision" check is gone): the value is cast, as GetFloat() casts it.
    'SingleUnnamedTensorErrors (double max into a float: inf)': (
        '{ "instances": [1.79769e+308, -1.79769e+308] }', {'default': 'float32'}, True,
        {'default': 'dtype: DT_FLOAT tensor_shape { dim { size: 2 } } float_val: [inf, -inf]'}),
    'SingleUnnamedTensorErrors (16777217 into a float)': (
        '{ "instances": [16777217, 1435774380] }', {'default': 'float32'}, True,
        {'default': 'dtype: DT_FLOAT tensor_shape { dim { size: 2 } } '
                    'float_val: [16777216, 1435774336]'}),
    'SingleUnnamedTensorErrors (9007199254740993 into a double)': (
        '{ "instances": [9007199254740993] }', {'default': 'float64'}, True,
        {'default': 'dtype: DT_DOUBLE tensor_shape { dim { size: 1 } } '
                    'double_val: 9007199254740992'}),
    # Issue 27: the first of two members with one name is the one TF Serving's FindMember finds.
    'two instances keys: the first': ('{"instances": [1], "instances": [2, 3]}',
                                      {'default': 'int32'}, True,
                                      {'default': 'dtype: DT_INT32 tensor_shape { dim { size: 1 } } '
                                                  'int_val: 1'}),
    'a deep value under a key nobody reads': (
        '{"instances": [1], "comment": ' + '[' * 5000 + ']' * 5000 + '}', {'default': 'int32'},
        True, {'default': 'dtype: DT_INT32 tensor_shape { dim { size: 1 } } int_val: 1'}),
}


@pytest.mark.parametrize('case', sorted(REQUESTS))
def test_requests_read_as_tf_serving_reads_them(case):
  body, dtypes, row_format, expected = REQUESTS[case]

  arrays, got_row_format = fill(body, **dtypes)

  assert got_row_format is row_format
  assert sorted(arrays) == sorted(expected)
  for name, text in expected.items():
    assert_tensor(arrays[name], tensor(text))


def test_non_utf8_bytes_of_a_string_reach_its_tensor_as_sent():
  # rapidjson does not check UTF-8 (no kParseValidateEncodingFlag): the bytes arrive as sent.
  arrays, _ = fill(b'{"instances": ["caf\xe9", "ok"]}', default='string')
  assert arrays['default'].tolist() == [b'caf\xe9', b'ok']


ERRORS = {
    # (TEST name, what): (body, input dtypes, words of TF Serving's message)
    ('SingleUnnamedTensorErrors', 'empty'): ('', {'default': 'int32'}, 'document is empty'),
    ('SingleUnnamedTensorErrors', 'signature_name 5'): (
        '{"signature_name": 5, "instances": [[1,2],[3,4],[5,6,7]]}', {'default': 'int32'},
        'must be a string value'),
    ('SingleUnnamedTensorErrors', 'both keys'): (
        '{"instances": [[1,2],[3,4],[5,6,7]], "inputs": [[1,2],[3,4],[5,6,7]]}',
        {'default': 'int32'}, 'Not formatted correctly'),
    ('SingleUnnamedTensorErrors', 'sizes'): ('{"instances": [[1,2],[3,4],[5,6,7]]}',
                                             {'default': 'int32'}, 'Expecting tensor size'),
    ('SingleUnnamedTensorErrors', 'nested shape'): ('{"instances": [[1,2],[3,4],[[5,6]]]}',
                                                    {'default': 'int32'}, 'Expecting shape'),
    ('SingleUnnamedTensorErrors', 'scalar and list'): ('{"instances": [1, [1]]}',
                                                       {'default': 'int32'}, 'Expecting shape'),
    ('SingleUnnamedTensorErrors', 'strings for int'): ('{"instances": [[1,2],["a", "b"]]}',
                                                       {'default': 'int32'},
                                                       'not of expected type'),
    ('MultipleNamedTensorErrors', 'shapes'): (
        '{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"]}, '
        '{"int_tensor": [[[7,8],[9,0],[1,2]]], "str_tensor": ["baz", "bat"]}]}',
        {'int_tensor': 'int32', 'str_tensor': 'string'}, 'Expecting shape'),
    ('MultipleNamedTensorErrors', 'sizes'): (
        '{"instances": [{"int_tensor": [[1,2],[3,4],[5,6],[7,8]], "str_tensor": ["foo", "bar"]}, '
        '{"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"]}]}',
        {'int_tensor': 'int32', 'str_tensor': 'string'}, 'Expecting tensor size'),
    ('MultipleNamedTensorErrors', 'object then list'): (
        '{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"]}, '
        '[1, 20, 30], {"int_tensor": [[[7,8],[9,0],[1,2]]], "str_tensor": ["baz", "bat"]}]}',
        {'int_tensor': 'int32', 'str_tensor': 'string'}, 'Expecting object but got list'),
    ('MultipleNamedTensorErrors', 'list then object'): (
        '{"instances": [["baz", "bar"], {"str_tensor": ["baz", "bat"]}]}',
        {'str_tensor': 'string'}, 'Expecting value/list but got object'),
    # Issue 27's own cases, each checked against json_tensor.cc and rapidjson.
    ('issue 27', 'true in a float tensor'): ('{"instances": [1.0, true]}', {'default': 'float32'},
                                            'JSON Value: true Type: True is not of expected type: '
                                            'float'),
    ('issue 27', 'parse error'): ('instances = [1, 2]', {'default': 'float32'},
                                  'JSON Parse error: Invalid value. at offset: 0'),
    # rapidjson refuses bytes after the document (kParseErrorDocumentRootNotSingular).
    ('issue 27', 'bytes after the document'): ('{"instances": [1]} X', {'default': 'int32'},
                                               'JSON Parse error: The document root must not be '
                                               'followed by other values. at offset: 19'),
    ('issue 27', 'an unclosed array'): ('{"instances": [1, 2}', {'default': 'int32'},
                                        "JSON Parse error: Missing a comma or ']' after an array "
                                        'element.'),
    ('issue 27', 'half'): ('{"instances": [1.0]}', {'default': 'float16'},
                           'to type: half'),
}


@pytest.mark.parametrize('case', sorted(ERRORS), ids=lambda case: ': '.join(case))
def test_refusals_have_tf_servings_messages(case):
  body, dtypes, words = ERRORS[case]

  refused = refusal(body, **dtypes)

  assert refused.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)
  assert words in refused.message


# --- Answers: MakeJsonFromTensors ---------------------------------------------------------------

INT_2x3x2 = ('dtype: DT_INT32 tensor_shape { dim { size: 2 } dim { size: 3 } dim { size: 2 } } '
             'int_val: [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]')
BYTES_2x2 = ('dtype: DT_STRING tensor_shape { dim { size: 2 } dim { size: 2 } } '
             'string_val: ["hello", "world", "tf", "serving"]')
ANSWERS = {
    # TEST name: ({output: TensorProto text}, row format?, the answer, compared as text?)
    'FromJsonSingleTensor (row)': ({'int_tensor': INT_2x3x2}, True,
                                   '{"predictions": [[[1, 2], [3, 4], [5, 6]], '
                                   '[[7, 8], [9, 0], [1, 2]]]}', False),
    'FromJsonSingleTensor (columnar)': ({'int_tensor': INT_2x3x2}, False,
                                        '{"outputs": [[[1, 2], [3, 4], [5, 6]], '
                                        '[[7, 8], [9, 0], [1, 2]]]}', False),
    'FromJsonSingleScalarTensor (row)': (
        {'int_tensor': 'dtype: DT_INT32 tensor_shape { dim { size: 5 } } int_val: [1, 2, 3, 4, 5]'},
        True, '{"predictions": [1, 2, 3, 4, 5]}', False),
    'FromJsonSingleScalarTensor (columnar)': (
        {'int_tensor': 'dtype: DT_INT32 tensor_shape { dim { size: 5 } } int_val: [1, 2, 3, 4, 5]'},
        False, '{"outputs": [1, 2, 3, 4, 5]}', False),
    'FromJsonSingleBytesTensor': ({'str_tensor_bytes': BYTES_2x2}, True,
                                  '{"predictions": [[{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}], '
                                  '[{"b64": "dGY="}, {"b64": "c2VydmluZw=="}]]}', False),
    'FromJsonSingleFloatTensorSixDigitPrecision': (
        {'float_tensor': 'dtype: DT_FLOAT tensor_shape { dim { size: 2 } dim { size: 3 } } '
                         'float_val: [9000000, 999999, 0.5, .0003, .00003, 555557.5]'}, True,
        '{"predictions":[[9e+06,999999.0,0.5],[0.0003,3e-05,555557.5]]}', True),
    'FromJsonSingleFloatTensorNonFinite': (
        {'float_tensor': 'dtype: DT_FLOAT tensor_shape { dim { size: 2 } dim { size: 2 } } '
                         'float_val: [nan, inf, 3, -inf]'}, True,
        '{"predictions":[[NaN,Infinity],[3.0,-Infinity]]}', True),
    # Issue 27: a NaN does not change how the other floats are written.
    'finite floats beside a NaN': (
        {'f': 'dtype: DT_FLOAT tensor_shape { dim { size: 3 } } float_val: [0.1, 2.05, nan]'},
        False, '{"outputs":[0.1,2.05,NaN]}', True),
    'a float that needs nine digits': (
        {'f': 'dtype: DT_FLOAT tensor_shape { dim { size: 1 } } float_val: 0.1234567'},
        False, '{"outputs":[0.123456702]}', True),
    'a zero-batch tensor': (
        {'f': 'dtype: DT_FLOAT tensor_shape { dim { size: 0 } dim { size: 2 } }'}, True,
        '{"predictions":[]}', True),
    'FromJsonMultipleNamedTensors (row)': ({
        'int_tensor': INT_2x3x2, 'str_tensor_bytes': BYTES_2x2,
        'str_tensor': 'dtype: DT_STRING tensor_shape { dim { size: 2 } dim { size: 2 } } '
                      'string_val: ["foo", "bar", "baz", "bat"]',
        'float_tensor': 'dtype: DT_FLOAT tensor_shape { dim { size: 2 } dim { size: 1 } } '
                        'float_val: [1, 2]',
        'double_scalar_tensor': 'dtype: DT_DOUBLE tensor_shape { dim { size: 2 } } '
                                'double_val: [8, 9]'}, True,
        '{"predictions": [{"double_scalar_tensor": 8.0, "float_tensor": [1.0], '
        '"int_tensor": [[1, 2], [3, 4], [5, 6]], "str_tensor": ["foo", "bar"], '
        '"str_tensor_bytes": [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}]}, '
        '{"double_scalar_tensor": 9.0, "float_tensor": [2.0], "int_tensor": [[7, 8], [9, 0], '
        '[1, 2]], "str_tensor": ["baz", "bat"], "str_tensor_bytes": [{"b64": "dGY="}, '
        '{"b64": "c2VydmluZw=="}]}]}', False),
    'FromJsonMultipleNamedTensors (columnar)': ({
        'int_tensor': INT_2x3x2,
        'float_tensor': 'dtype: DT_FLOAT tensor_shape { dim { size: 2 } dim { size: 1 } } '
                        'float_val: [1, 2]'}, False,
        '{"outputs": {"float_tensor": [[1.0], [2.0]], '
        '"int_tensor": [[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 0], [1, 2]]]}}', False),
}


@pytest.mark.parametrize('case', sorted(ANSWERS))
def test_answers_written_as_tf_serving_writes_them(case):
  tensors, row_format, expected, as_text = ANSWERS[case]

  body = write_answer({name: tensor(text) for name, text in tensors.items()}, row_format)

  if as_text:   # CompareJsonAllValuesAsStrings: the numbers' very text
    assert body.decode() == expected
  else:
    assert json.loads(body) == json.loads(expected)


def test_non_utf8_string_outputs_are_written_byte_for_byte():
  body = write_answer({'s': np.array([b'caf\xe9', b'a"\n'], dtype=object)}, False)
  assert body == b'{"outputs":["caf\xe9","a\\"\\n"]}'


ANSWER_ERRORS = {
    'FromJsonSingleTensorErrors (empty)': ({}, 'empty tensor map'),
    'FromJsonSingleTensorErrors (complex64)': (
        {'tensor': 'dtype: DT_COMPLEX64 tensor_shape { dim { size: 2 } } '
                   'scomplex_val: [1, 2, 3, 4]'},
        'Failed to write JSON value for tensor type: complex64'),
    'FromJsonSingleTensorErrors (no shape)': ({'tensor': 'dtype: DT_INT32 int_val: 1'},
                                              'no shape information'),
    'FromJsonMultipleNamedTensorsErrors': ({
        'int_tensor': 'dtype: DT_INT32 tensor_shape { dim { size: 2 } dim { size: 3 } } '
                      'int_val: [1, 2, 3, 4, 5, 6]',
        'str_tensor': 'dtype: DT_STRING tensor_shape { dim { size: 1 } dim { size: 3 } } '
                      'string_val: ["foo", "bar", "baz"]'}, 'inconsistent batch size'),
    # AddSingleValueAndAdvance has no case for DT_HALF: TF Serving refuses it too.
    'half': ({'tensor': 'dtype: DT_HALF tensor_shape { dim { size: 1 } } half_val: 15360'},
             'Failed to write JSON value for tensor type: half'),
}


@pytest.mark.parametrize('case', sorted(ANSWER_ERRORS))
def test_answers_tf_serving_cannot_write_are_invalid_argument(case):
  tensors, words = ANSWER_ERRORS[case]
  with pytest.raises(Refusal) as raised:
    write_answer({name: tensor(text) for name, text in tensors.items()}, row_format=True)
  assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
  assert words in raised.value.message


# --- The client reads whatever TF Serving may write ---------------------------------------------

@pytest.mark.parametrize('text,want', [
    ('[9e+06, 999999.0, 3e-05]', [9e6, 999999.0, 3e-05]),
    ('[0.123456702, 1.00000012]', [0.1234567, 1.0000001]),           # %.9g
    ('[NaN, Infinity, -Infinity]', [np.nan, np.inf, -np.inf]),       # WriteDecimal's spellings
    ('[1E+2, 2.5e-3, 1e-45]', [100.0, 0.0025, 1e-45]),
])
def test_the_rest_client_reads_every_float_spelling_tf_serving_writes(text, want):
  body = f'{{"outputs": {{"weather": {text}, "ground": [1]}}}}'.encode()

  outputs = read_float_outputs(body, ['weather', 'ground'])

  np.testing.assert_array_equal(outputs['weather'], np.array(want, dtype=np.float32))


def test_the_rest_client_reads_what_the_local_server_writes():
  floats = np.array([0.1, 2.05, 1e-7, 3.4028235e38, np.nan, -np.inf, 0.1234567], np.float32)
  body = write_answer({'weather': floats, 'ground': floats[:2]}, row_format=False)
  np.testing.assert_array_equal(read_float_outputs(body, ['weather'])['weather'], floats)
