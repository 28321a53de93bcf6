"""What the prediction client and the local server share: TF Serving's messages, their limit, the channel.

Both sides read and write `tensorflow.serving` protos: the client encodes images into a
`PredictRequest` and reads the `PredictResponse`'s tensors; the server reads the request tensors
and writes its outputs the way TF Serving does. Channels go over TLS, or plaintext only to this machine.

Usage:
  channel = open_channel('localhost:8500')
  response = PredictionServiceStub(channel).Predict(build_predict_request(images), timeout=30)
  weather = tensor_from_proto(response.outputs['weather'])
"""
import ipaddress
from typing import Sequence

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2

from model import schema

__all__ = [
    'GRPC_DEFAULT_MAX_MESSAGE_BYTES', 'METADATA_FIELD', 'build_predict_request', 'check_transport',
    'encode_images', 'is_loopback_host', 'open_channel', 'parse_address',
    'tensor_as_proto_field', 'tensor_from_proto',
]

# gRPC's default limit on a received message. tensorflow_model_server raises its own to 2 GiB, but
# proxies, load balancers and servers started with --grpc_channel_arguments keep 4 MiB; staying
# under it works everywhere and keeps each call short. The local server keeps it as its limit so
# that tests hold the client to it.
GRPC_DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# The one GetModelMetadata field TF Serving supports: the model's SignatureDefMap.
METADATA_FIELD = 'signature_def'
# A channel whose server went away retries its connection on gRPC's backoff (1 s, then x1.6 up to
# 120 s); capped here so that a restarted server is found again within a couple of seconds.
_CHANNEL_OPTIONS = (
    ('grpc.initial_reconnect_backoff_ms', 200),
    ('grpc.min_reconnect_backoff_ms', 200),
    ('grpc.max_reconnect_backoff_ms', 2000),
)


# ---------------------------------------------------------------------------------------------
# Addresses and channels.

def parse_address(address: str) -> tuple[str, int]:
  """'host:port' or '[v6]:port' -> (host, port); a ValueError saying what is wrong otherwise."""
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'serving address {address!r} is not HOST:PORT (e.g. localhost:8500)')
  if host.startswith('['):
    if not host.endswith(']'):
      raise ValueError(f'serving address {address!r}: an IPv6 host goes in brackets, [::1]:8500')
    host = host[1:-1]
  elif ':' in host:
    raise ValueError(f'serving address {address!r}: write an IPv6 host in brackets, [::1]:8500')
  return host, int(port)


def is_loopback_host(host: str) -> bool:
  """True for localhost, 127.0.0.0/8 and ::1: names decided without a DNS lookup."""
  if host.lower().rstrip('.') == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def check_transport(address: str, *, use_tls: bool = False, allow_insecure: bool = False) -> str:
  """Decides how to reach `address`: 'tls' or 'insecure'; refuses plaintext beyond this machine.

  Raises:
    ValueError: a malformed address, both options at once, or plaintext to a host that is not
      loopback without `allow_insecure`.
  """
  host, _ = parse_address(address)
  if use_tls and allow_insecure:
    raise ValueError('use_tls (--tls) and allow_insecure (--allow_insecure) contradict each other; '
                     'pick one')
  if use_tls:
    return 'tls'
  if not allow_insecure and not is_loopback_host(host):
    raise ValueError(
        f'refusing a plaintext gRPC channel to {host}: it is not a loopback address, and the '
        'images would cross the network unencrypted. Use TLS (use_tls=True; --tls, with '
        '--root_cert FILE for a private CA) or, on a network you trust, allow it explicitly '
        '(allow_insecure=True; --allow_insecure).')
  return 'insecure'


def open_channel(address: str, *, use_tls: bool = False, root_certificates: bytes | None = None,
                 tls_server_name: str | None = None, allow_insecure: bool = False) -> grpc.Channel:
  """A gRPC channel to `address`, over TLS or (loopback, or explicitly allowed) plaintext."""
  options = list(_CHANNEL_OPTIONS)
  if check_transport(address, use_tls=use_tls, allow_insecure=allow_insecure) == 'tls':
    if tls_server_name:
      options.append(('grpc.ssl_target_name_override', tls_server_name))
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.secure_channel(address, credentials, options=options)
  return grpc.insecure_channel(address, options=options)


# ---------------------------------------------------------------------------------------------
# Tensors.

def tensor_from_proto(proto: tensor_pb2.TensorProto) -> np.ndarray:
  """A tensor as an array, read by TF itself: tensor_content or the typed *_val fields.

  A typed field shorter than the shape is filled with its last value, as TF Serving's own reader does.
  """
  return tf.make_ndarray(proto)


def encode_images(images: Sequence[np.ndarray]) -> tensor_pb2.TensorProto:
  """uint8 [N, H, W, 3] as one TensorProto with raw tensor_content (no per-pixel lists)."""
  stacked = np.ascontiguousarray(np.stack(images), dtype=np.uint8)
  proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8, tensor_content=stacked.tobytes())
  proto.tensor_shape.dim.extend(proto.tensor_shape.Dim(size=int(s)) for s in stacked.shape)
  return proto


def tensor_as_proto_field(array: np.ndarray) -> tensor_pb2.TensorProto:
  """An output tensor the way TF Serving's Predict writes it (`AsProtoField`: float_val, not bytes)."""
  if array.dtype != np.float32:
    return tf.make_tensor_proto(array)
  proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
  proto.tensor_shape.dim.extend(
      [proto.tensor_shape.Dim(size=int(size)) for size in array.shape])
  proto.float_val.extend(array.ravel().tolist())
  return proto


# ---------------------------------------------------------------------------------------------
# Predict requests and answers.

def build_predict_request(images: Sequence[np.ndarray], model_name: str = schema.MODEL_NAME,
                          model_version: int | None = None,
                          signature: str = schema.SERVING_SIGNATURE,
                          version_label: str | None = None) -> predict_pb2.PredictRequest:
  """A PredictRequest for a list of same-shaped uint8 images (to a version, a label or the
  latest)."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model_name
  request.model_spec.signature_name = signature
  if model_version is not None:
    request.model_spec.version.value = model_version
  if version_label is not None:
    request.model_spec.version_label = version_label
  request.inputs[schema.INPUT_IMAGES].CopyFrom(encode_images(images))
  request.output_filter.extend(schema.OUTPUT_NAMES)
  return request
