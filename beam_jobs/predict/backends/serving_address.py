"""What --serving_address may be, and which protocol answers there when the model check fails.

TF Serving listens on two ports: gRPC (`--port`, 8500) and its REST API (`--rest_api_port`, 8501).
Aimed at the wrong one, neither client says so: gRPC waits out its deadline against an HTTP/1
server, and `requests` reports the raw bytes of an HTTP/2 SETTINGS frame. So when the start-up
check gets no answer, one short probe on a plain socket (an HTTP/1.1 request, a few hundred bytes
read back) tells which kind of server is there, and the message says which port or protocol to
use instead. The probe runs only after a failure: a working server never sees it.

Usage:
  check_serving_address('http://localhost:8501')   # ValueError: give HOST:PORT without a scheme
  if answering_protocol('localhost:8501') == HTTP1:
    ...   # a REST port, not a gRPC one
"""
import socket
import ssl
import time
import urllib.parse

from model.serving.protocol import parse_address

__all__ = ['HTTP1', 'HTTP2', 'answering_protocol', 'check_serving_address', 'grpc_port_message',
           'rest_port_message']

HTTP1 = 'HTTP/1'
HTTP2 = 'HTTP/2'
# A status line, or an HTTP/2 frame header, is in the first bytes of any answer.
_PROBE_BYTES = 256
_PROBE_TIMEOUT_SECS = 1.0
# RFC 9113 section 6.5: SETTINGS is frame type 4, sent first by every HTTP/2 server, on stream 0,
# with a payload of 6-byte entries.
_HTTP2_SETTINGS = 4
_HTTP2_FRAME_HEADER_BYTES = 9
_SETTING_BYTES = 6


def check_serving_address(address: str) -> None:
  """Refuses an address with a scheme (http://, https://, grpc://) before it is parsed as HOST:PORT.

  Raises:
    ValueError: one line that gives the address without its scheme, and the flag for TLS.
  """
  if '://' not in address:
    return
  parts = urllib.parse.urlsplit(address)
  bare = parts.netloc or 'HOST:PORT'
  tls = parts.scheme.lower() in ('https', 'grpcs')
  raise ValueError(
      f'serving address {address!r}: give HOST:PORT without a scheme ({parts.scheme}://), e.g. '
      f'--serving_address {bare}{" --tls" if tls else ""}: use --tls for TLS and '
      '--serving_protocol rest for the REST API')


def _protocol_of(answer: bytes) -> str | None:
  if answer.startswith(b'HTTP/1.'):
    return HTTP1
  if (len(answer) >= _HTTP2_FRAME_HEADER_BYTES and answer[3] == _HTTP2_SETTINGS
      and answer[5:9] == bytes(4) and int.from_bytes(answer[:3], 'big') % _SETTING_BYTES == 0):
    return HTTP2
  return None


def answering_protocol(address: str, *, use_tls: bool = False,
                       root_certificates: bytes | None = None, server_name: str | None = None,
                       timeout_secs: float = _PROBE_TIMEOUT_SECS) -> str | None:
  """HTTP1 or HTTP2: which server answers an HTTP/1.1 request at `address`; None if neither does.

  Bounded: one connection, one small request, at most `_PROBE_BYTES` read back, all within about
  `timeout_secs`. With `use_tls` the probe goes over TLS, trusting what the client trusts.
  """
  host, port = parse_address(address)
  give_up_at = time.monotonic() + timeout_secs
  answer = b''
  try:
    with socket.create_connection((host, port), timeout=timeout_secs) as connection:
      if use_tls:
        context = ssl.create_default_context(
            cadata=root_certificates.decode('ascii') if root_certificates else None)
        # Offered both: a gRPC server takes no TLS connection without h2, and an HTTP/1 one
        # picks http/1.1 (or ignores the offer) and answers the request below.
        context.set_alpn_protocols(['h2', 'http/1.1'])
        connection = context.wrap_socket(connection, server_hostname=server_name or host)
        if connection.selected_alpn_protocol() == 'h2':
          return HTTP2
      bracketed = f'[{host}]' if ':' in host else host
      connection.sendall(f'GET / HTTP/1.1\r\nHost: {bracketed}:{port}\r\n'
                         'Connection: close\r\n\r\n'.encode('ascii'))
      while len(answer) < _PROBE_BYTES and _protocol_of(answer) is None:
        left = give_up_at - time.monotonic()
        if left <= 0:
          break
        connection.settimeout(left)
        chunk = connection.recv(_PROBE_BYTES - len(answer))
        if not chunk:
          break
        answer += chunk
  except (OSError, ValueError):   # refused, reset, timed out, TLS refused: nothing to tell
    pass
  return _protocol_of(answer)


def grpc_port_message(address: str) -> str:
  """What a gRPC client says when an HTTP/1 server answered at `address`."""
  return (f'an HTTP/1 server answered at {address}, not gRPC: probably TF Serving\'s REST API '
          'port (--rest_api_port). Use --serving_protocol rest for it, or give the gRPC port '
          '(--port, 8500 by default)')


def rest_port_message(url: str) -> str:
  """What a REST client says when a gRPC (HTTP/2) server answered at `url`."""
  return (f'a gRPC (HTTP/2) server answered at {url}, not a REST API: probably TF Serving\'s '
          'gRPC port (--port). Use the gRPC protocol (the default: leave out --serving_protocol '
          'rest) for it, or give the REST API port (--rest_api_port, 8501 by default)')
