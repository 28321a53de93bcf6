"""What the REST client and the local server share: TF Serving's REST paths, HTTP statuses, errors.

TF Serving answers its REST API (`--rest_api_port`) with the HTTP status that
`model_servers/http_server.cc` (`ToHTTPStatusCode`) gives each gRPC status code, and a body of
`{"error": "<message>"}`; the message is the one its gRPC API would send. The client reads the
status back into that code, so one retry policy serves both APIs.

Usage:
  url = base_url('localhost:8501') + predict_path('PlanetModel', 3)   # or label='stable'
  status = HTTP_STATUS_BY_CODE[grpc.StatusCode.NOT_FOUND]       # 404
  code = code_of_http_status(503)                               # UNAVAILABLE: retried
"""
import json
import re
import urllib.parse

import grpc

from model.serving.protocol import parse_address

__all__ = [
    'HTTP_STATUS_BY_CODE', 'PREDICT_PATH', 'STATUS_PATH', 'base_url', 'code_of_http_status',
    'error_body', 'predict_path', 'status_path',
]

# TF Serving's routes (http_rest_api_util.cc), matched case-insensitively against the whole path.
PREDICT_PATH = re.compile(
    r'/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)',
    re.IGNORECASE)
STATUS_PATH = re.compile(
    r'/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?',
    re.IGNORECASE)

# ToHTTPStatusCode of tensorflow_serving/model_servers/http_server.cc.
HTTP_STATUS_BY_CODE = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
# The way back, for the client. Where TF Serving folds several codes into one status, the one that
# decides what a client does wins: 400 is INVALID_ARGUMENT (may lie in one image), 500 INTERNAL.
# 413 is what an HTTP server or proxy answers a body over its limit (TF Serving has no limit): the
# request, not the server, is at fault. 502 is what a proxy in front of TF Serving (KServe's or
# Vertex AI's) answers while the server behind it restarts: as transient as TF Serving's own 503.
_CODE_BY_HTTP_STATUS = {
    **{status: code for code, status in HTTP_STATUS_BY_CODE.items()
       if code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                       grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
                       grpc.StatusCode.ALREADY_EXISTS)},
    413: grpc.StatusCode.INVALID_ARGUMENT,
    502: grpc.StatusCode.UNAVAILABLE,
}


def code_of_http_status(status: int) -> grpc.StatusCode:
  """The gRPC status code TF Serving sent as HTTP `status` (UNKNOWN for one it never sends)."""
  return _CODE_BY_HTTP_STATUS.get(status, grpc.StatusCode.UNKNOWN)


def error_body(message: str) -> bytes:
  """TF Serving's error answer: `{"error": "<message>"}`."""
  return json.dumps({'error': message}).encode()


def base_url(address: str, use_tls: bool = False) -> str:
  """'host:port' -> 'http://host:port' ('https://' with TLS; an IPv6 host in brackets)."""
  host, port = parse_address(address)
  if ':' in host:
    host = f'[{host}]'
  return f'{"https" if use_tls else "http"}://{host}:{port}'


def _model_path(model_name: str, version: int | None, label: str | None) -> str:
  path = f'/v1/models/{urllib.parse.quote(model_name, safe="")}'
  if label is not None:
    return f'{path}/labels/{urllib.parse.quote(label, safe="")}'
  return path if version is None else f'{path}/versions/{int(version)}'


def predict_path(model_name: str, version: int | None = None, label: str | None = None) -> str:
  """/v1/models/NAME[/versions/N | /labels/LABEL]:predict"""
  return _model_path(model_name, version, label) + ':predict'


def status_path(model_name: str, version: int | None = None, metadata: bool = False,
                label: str | None = None) -> str:
  """/v1/models/NAME[/versions/N | /labels/LABEL] (GetModelStatus), with /metadata:
  GetModelMetadata."""
  return _model_path(model_name, version, label) + ('/metadata' if metadata else '')
