"""The REST API over HTTP: an aiohttp server on a thread of its own, started and stopped at will.

aiohttp parses HTTP (keep-alive, chunked bodies, the body-size limit); `RestApi` answers. Calls
run on a thread pool, as TF Serving's run on its `--rest_api_num_threads`: a model call holds its
thread, never the event loop. A body over `max_body_bytes` is answered 413 with a JSON error
before the handler sees it (TF Serving sets no limit; the local server keeps one, as it does for
gRPC, so that clients are held to a size that proxies accept). `stop()` closes the port and every
connection at once, as a crashed server would; `start()` listens on the same port again.

Usage:
  server = RestServer('127.0.0.1', port=0, max_body_bytes=4 << 20)
  port = server.start(RestApi(repository, prediction_service, model_service))
  server.stop()
"""
import asyncio
import concurrent.futures
import logging
import os
import ssl
import tempfile
import threading

from aiohttp import web

from model.serving.rest_api import RestApi
from model.serving.rest_protocol import error_body

__all__ = ['RestServer']

_log = logging.getLogger('planet.serve')


def _server_tls(key: bytes, cert: bytes) -> ssl.SSLContext:
  """A server SSLContext from PEM bytes (Python's ssl reads certificates from files only)."""
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  with tempfile.TemporaryDirectory(prefix='planet-serve-tls-') as folder:
    paths = []
    for name, pem in (('cert.pem', cert), ('key.pem', key)):
      path = os.path.join(folder, name)
      with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), 'wb') as f:
        f.write(pem)
      paths.append(path)
    context.load_cert_chain(*paths)
  return context


class RestServer:
  """Serves a `RestApi` over HTTP (HTTPS with a key and certificate) on `host:port`.

  Args:
    host, port: where to listen; port 0 picks a free one, kept for restarts.
    max_body_bytes: the largest request body accepted.
    ssl_key, ssl_cert: PEM bytes; with both, HTTPS only.
    threads: calls answered at once.
  """

  def __init__(self, host: str, port: int = 0, *, max_body_bytes: int,
               ssl_key: bytes | None = None, ssl_cert: bytes | None = None, threads: int = 8):
    self._api: RestApi | None = None
    self.host = host
    self.port = port
    self._max_body_bytes = max_body_bytes
    self._tls = _server_tls(ssl_key, ssl_cert) if ssl_key is not None else None
    self._threads = threads
    self._loop: asyncio.AbstractEventLoop | None = None
    self._runner: web.AppRunner | None = None
    self._thread: threading.Thread | None = None
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  async def _handle(self, request: web.Request) -> web.Response:
    try:
      body = await request.read()
    except web.HTTPRequestEntityTooLarge:
      return self._json(413, error_body(
          f'request body of {request.content_length or "more than"} bytes is larger than this '
          f'server accepts ({self._max_body_bytes} bytes); send fewer images per request'))
    try:
      status, answer = await asyncio.get_running_loop().run_in_executor(
          self._pool, self._api.answer, request.method, request.rel_url.raw_path, body)
    except Exception as error:  # pylint: disable=broad-except
      # A bug answering one call must not take the server down; the client sees a 500.
      _log.exception('serve: REST %s %s failed', request.method, request.rel_url.raw_path)
      status, answer = 500, error_body(f'{type(error).__name__}: {error}')
    return self._json(status, answer)

  @staticmethod
  def _json(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type='application/json')

  def start(self, api: RestApi) -> int:
    """Listens (on a thread of its own), answering with `api`; returns the port, or OSError."""
    if self._thread is not None:
      raise RuntimeError(f'already serving REST on {self.host}:{self.port}')
    self._api = api
    started = concurrent.futures.Future()
    self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix='rest')
    self._thread = threading.Thread(target=self._serve, args=(started,), name='serve-rest',
                                    daemon=True)
    self._thread.start()
    try:
      self.port = started.result()
    except OSError:
      self._thread.join()
      self._thread = None
      self._pool.shutdown(wait=False)
      raise
    return self.port

  def _serve(self, started: concurrent.futures.Future) -> None:
    loop = asyncio.new_event_loop()
    app = web.Application(client_max_size=self._max_body_bytes)
    app.router.add_route('*', '/{path:.*}', self._handle)
    # stop() drops calls in flight at once, like a crash (aiohttp reads a timeout of 0 as none).
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.01)
    try:
      loop.run_until_complete(runner.setup())
      # No SO_REUSEPORT: two servers must never share a port by accident.
      site = web.TCPSite(runner, self.host, self.port, ssl_context=self._tls, reuse_port=False)
      loop.run_until_complete(site.start())
    except OSError as error:
      loop.run_until_complete(runner.cleanup())
      loop.close()
      started.set_exception(OSError(f'cannot listen on {self.host}:{self.port}: {error}'))
      return
    self._loop, self._runner = loop, runner
    started.set_result(runner.addresses[0][1])
    try:
      loop.run_forever()
    finally:
      loop.run_until_complete(runner.cleanup())
      loop.close()

  def stop(self) -> None:
    """Closes the port and every connection; calls in flight get no answer."""
    if self._thread is None:
      return
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join()
    self._pool.shutdown(wait=False, cancel_futures=True)
    self._thread = self._loop = self._runner = self._pool = None
