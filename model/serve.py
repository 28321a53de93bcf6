"""The `python -m model.serve` command: the TF Serving-compatible local server, from flags.

The server itself is `model.serving.local_server.LocalServingServer` (its module says how it
matches TF Serving and where it deliberately does not); this command adds TLS from PEM files and
fault injection from flags. Production runs TensorFlow Serving itself (docs/serving.md).

Usage:
  python -m model.serve --model_base_path EXPORT/PlanetModel --port 8500 [--rest_api_port 8501]
      [--model_name PlanetModel] | --model_config_file models.config
      [--model_config_file_poll_wait_seconds 60] [--enable_batching [--batching_parameters_file FILE]
      [--max_batch_size N] [--batch_timeout_micros N] [--num_batch_threads N]
      [--max_enqueued_batches N]] [--verbose]
"""
from model import command_line

if __name__ == '__main__':
  # Before TensorFlow loads: its C++ libraries log as they load (model/command_line.py).
  command_line.quiet_third_party()

# pylint: disable=wrong-import-position,wrong-import-order
import dataclasses
import logging
import signal

import grpc
import tensorflow as tf

from model import schema
from model.serving.batching import BatchingParameters
from model.serving.batching import parse_batching_parameters
from model.serving.faults import Faults
from model.serving.local_server import DEFAULT_POLL_SECONDS
from model.serving.local_server import LocalServingServer

__all__ = ['main']

_log = logging.getLogger('planet.serve')


def _read_file(path: str | None) -> bytes | None:
  if path is None:
    return None
  with tf.io.gfile.GFile(path, 'rb') as f:
    return f.read()


def _batching(args, parser) -> BatchingParameters | None:
  """TF Serving's batching parameters: the file's, then the flags', over TF Serving's defaults."""
  flags = {field.name: getattr(args, field.name) for field in dataclasses.fields(BatchingParameters)
           if getattr(args, field.name) is not None}
  if not args.enable_batching:
    if flags or args.batching_parameters_file:
      parser.error('--batching_parameters_file and the batching parameters go with '
                   '--enable_batching')
    return None
  try:
    parameters = (parse_batching_parameters(_read_file(args.batching_parameters_file).decode())
                  if args.batching_parameters_file else BatchingParameters())
    return dataclasses.replace(parameters, **flags)
  except (ValueError, OSError, tf.errors.OpError) as error:
    parser.error(f'{args.batching_parameters_file or "batching"}: {error}')


def main(argv=None) -> None:
  """Parses the flags, serves until interrupted."""
  parser = command_line.ArgumentParser(
      prog='python -m model.serve',
      description='A TF Serving-compatible gRPC and REST server for development and tests '
                  '(production: tensorflow_model_server).')
  parser.add_argument('--model_base_path', type=command_line.user_path,
                      help='EXPORT/PlanetModel: numbered versions')
  parser.add_argument('--model_config_file', type=command_line.user_path,
                      help="TF Serving's ModelServerConfig in text format (one model: name, "
                           'base_path, model_version_policy, version_labels), instead of '
                           '--model_base_path and --model_name')
  parser.add_argument('--model_config_file_poll_wait_seconds', type=float, default=0.0,
                      help='read --model_config_file again this often (0: only at start), as '
                           'TF Serving does; a changed label applies at once')
  parser.add_argument('--port', type=int, default=8500, help='the gRPC API\'s port')
  parser.add_argument('--rest_api_port', type=int, default=0,
                      help='the REST API\'s port (TF Serving\'s JSON API); 0: no REST API, as '
                           'with tensorflow_model_server')
  parser.add_argument('--model_name', default=schema.MODEL_NAME)
  parser.add_argument('--host', default='127.0.0.1',
                      help='interface to listen on (0.0.0.0: every interface, as TF Serving does)')
  parser.add_argument('--file_system_poll_wait_seconds', type=float, default=DEFAULT_POLL_SECONDS)
  parser.add_argument('--ssl_cert_file', type=command_line.user_path,
                      help='PEM certificate; with --ssl_key_file, serve TLS only (HTTPS for REST)')
  parser.add_argument('--ssl_key_file', type=command_line.user_path,
                      help='PEM private key of --ssl_cert_file')
  parser.add_argument('--inject_latency_secs', type=float, default=0.0,
                      help='fault injection: delay every Predict answer (gRPC and REST)')
  parser.add_argument('--inject_failure_fraction', type=float, default=0.0,
                      help='fault injection: answer this share of Predict calls with an error '
                           '(over REST, with the HTTP status TF Serving gives its code: 503 for '
                           'UNAVAILABLE)')
  parser.add_argument('--inject_failure_code', default='UNAVAILABLE',
                      choices=['UNAVAILABLE', 'RESOURCE_EXHAUSTED', 'DEADLINE_EXCEEDED', 'INTERNAL'])
  parser.add_argument('--seed', type=int, default=0, help='fault injection: random seed')
  parser.add_argument('--grpc_max_threads', type=int, default=8,
                      help='threads answering calls; with batching, the most requests merged '
                           'into one model call at a time (TF Serving: the same flag)')
  parser.add_argument('--enable_batching', action='store_true',
                      help="merge concurrent Predict calls into model-sized batches, as TF "
                           "Serving's --enable_batching does")
  parser.add_argument('--batching_parameters_file', type=command_line.user_path,
                      help="TF Serving's batching parameters in its text format "
                           "('max_batch_size { value: 128 }' per line)")
  for name, text in (('max_batch_size', 'rows (images) per model call (TF Serving: 1000)'),
                     ('batch_timeout_micros', 'how long a batch that is not full waits for more '
                                              'requests (TF Serving: 0)'),
                     ('num_batch_threads', 'batches run at the same time (TF Serving: the CPUs)'),
                     ('max_enqueued_batches', 'batches waiting before requests are answered '
                                              'UNAVAILABLE (TF Serving: 10)')):
    parser.add_argument(f'--{name}', type=int,
                        help=f'batching: {text}; overrides --batching_parameters_file')
  args = parser.parse_args(argv)
  if (args.model_base_path is None) == (args.model_config_file is None):
    parser.error('give --model_base_path (with --model_name) or --model_config_file, one of them')
  if args.model_config_file_poll_wait_seconds < 0 or (
      args.model_config_file_poll_wait_seconds and not args.model_config_file):
    parser.error('--model_config_file_poll_wait_seconds is 0 or more, with --model_config_file')
  if args.grpc_max_threads < 1:
    parser.error('--grpc_max_threads must be at least 1')
  args.batching = _batching(args, parser)
  if args.rest_api_port < 0 or (args.rest_api_port and args.rest_api_port == args.port):
    parser.error('--rest_api_port must be 0 (no REST API) or a port other than --port')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
  try:
    server = _start(args)
  except (ValueError, OSError, tf.errors.OpError) as error:
    parser.exit(1, f'{parser.prog}: error: {error}\n')
  if server.served_version is None:
    _log.warning('serve: no complete version under %s yet; waiting for one',
                 server.repository.base_path)
  # SIGTERM (a container or a benchmark stopping the server) ends it like Ctrl-C does.
  signal.signal(signal.SIGTERM, signal.default_int_handler)
  try:
    server.wait()
  except KeyboardInterrupt:
    server.stop()
  requests = server.model_call_requests
  _log.info('serve: %d Predict requests answered by %d model calls (%.1f images per call)',
            sum(requests), len(requests), sum(server.model_call_rows) / max(1, len(requests)))


def _start(args) -> LocalServingServer:
  """The server of the flags, started (a config file or label it refuses: ValueError)."""
  server = LocalServingServer(
      args.model_base_path, args.port, rest_api_port=args.rest_api_port or None,
      model_name=args.model_name, host=args.host,
      poll_seconds=args.file_system_poll_wait_seconds,
      ssl_key=_read_file(args.ssl_key_file), ssl_cert=_read_file(args.ssl_cert_file),
      faults=Faults(args.inject_latency_secs, args.inject_failure_fraction,
                    grpc.StatusCode[args.inject_failure_code], args.seed),
      max_workers=args.grpc_max_threads, batching=args.batching,
      model_config_file=args.model_config_file,
      model_config_file_poll_seconds=args.model_config_file_poll_wait_seconds)
  server.start()
  return server


if __name__ == '__main__':
  main()
