"""Prediction: the Beam job (in-process, gRPC, REST) beside the model's limit and the tutorial's.

Usage: python -m benchmarks --only predict [--quick] [--work /tmp/planet_bench]
       (the same figures as the prediction part of `python -m benchmarks`)

Figures, all on the same chips and the same export (untrained: speed does not depend on the
weights) at 128 px:
  decode_only:      the one decoder over the first `loop_images` chips, bytes already in memory.
  plain_model_loop: `serving_default` of the loaded SavedModel on pre-decoded uint8 batches of 64
                    in a plain loop: the model's limit on this machine.
  serial_limit:     1 / (1/decode + 1/model): one process that decodes, then predicts, with no
                    overhead at all (derived, not measured).
  job_in_process:   python -m beam_jobs.predict --model_dir, DirectRunner in-process, as a
                    command at two sizes (overall and steady rates, peak RSS of its processes).
  job_grpc:         the same with --serving_address, against `python -m model.serve` (the
                    project's TF Serving-compatible server, LocalServingServer) in its own process,
                    started once before the runs, as a serving deployment would be.
  job_rest:         the same with --serving_protocol rest, against the same server's REST port.
  float_client:     the tutorial's client (benchmarks/baselines.py): one float32 image per
                    PredictRequest to `predict_float` of the same server, in turn.
  server_limit:     the same server fed pre-decoded uint8 requests as the gRPC job sends them
                    (32 images each, 4 in flight): what the server itself can take.
  server_limit_rest: the same over REST: the JSON bodies the REST job sends (as many images as
                    fit its 4 MiB body, 4 in flight), encoded before the clock starts.
  wire_bytes_per_image: request bytes per image as each client sends them, from the clients' own
                    encoders on these chips: the gRPC and REST jobs' requests, the tutorial's
                    float32 PredictRequest and its REST call (float64 JSON, as `requests`' json=
                    writes it); in-process sends nothing.
"""
import concurrent.futures
import os
import shutil
import socket
import subprocess
import time

import numpy as np

from benchmarks import commands, workspace
from benchmarks.plan import Plan, loop_figures, ratio, two_size_figures

JOBS = ('job_in_process', 'job_grpc', 'job_rest')
MODEL_BATCH = 64
# ServingGrpcHandler's defaults.
IMAGES_PER_REQUEST = 32
REQUESTS_IN_FLIGHT = 4


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


class ServerProcess:
  """`python -m model.serve` in its own process, ready once its model is AVAILABLE."""

  def __init__(self, model_base_path: str):
    self.model_base_path = model_base_path
    self.port, self.rest_port = _free_port(), _free_port()
    self.address = f'127.0.0.1:{self.port}'
    self.rest_address = f'127.0.0.1:{self.rest_port}'
    self.process = None

  def __enter__(self) -> 'ServerProcess':
    # pylint: disable=import-outside-toplevel
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc
    self.process = subprocess.Popen(
        commands.python_module('model.serve', '--model_base_path', self.model_base_path,
                               '--port', str(self.port), '--rest_api_port', str(self.rest_port)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = 'PlanetModel'
    with grpc.insecure_channel(self.address) as channel:
      stub = model_service_pb2_grpc.ModelServiceStub(channel)
      deadline = time.monotonic() + 120
      while time.monotonic() < deadline:
        if self.process.poll() is not None:
          raise RuntimeError(f'model.serve exited with {self.process.returncode}')
        try:
          if any(s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
                 for s in stub.GetModelStatus(request, timeout=2).model_version_status):
            return self
        except grpc.RpcError:
          pass
        time.sleep(0.3)
    self.__exit__()
    raise TimeoutError('model.serve did not serve the model within 120 s')

  def rss_mb(self) -> float:
    return commands.tree_rss_bytes(self.process.pid) / 2**20

  def __exit__(self, *exc_info) -> None:
    if self.process is not None and self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()


def _job_command(job: str, images_dir: str, out: str, export_base: str,
                 server: ServerProcess) -> list[str]:
  model_dir = os.path.join(export_base, 'PlanetModel')
  backend = {'job_in_process': (), 'job_grpc': ('--serving_address', server.address),
             'job_rest': ('--serving_address', server.rest_address, '--serving_protocol', 'rest'),
             }[job]
  return commands.python_module('beam_jobs.predict', '--input', images_dir, '--output_dir', out,
                                '--model_dir', model_dir, '--overwrite', *backend)


def feed_server(address: str, pixels: np.ndarray) -> None:
  """Pre-decoded uint8 images to the server in the gRPC job's requests, as fast as it answers."""
  # pylint: disable=import-outside-toplevel
  import grpc
  from tensorflow_serving.apis import prediction_service_pb2_grpc
  from model.serving.protocol import build_predict_request

  def send(stub, start: int):
    return stub.Predict(build_predict_request(list(pixels[start:start + IMAGES_PER_REQUEST])), 30.0)

  with grpc.insecure_channel(address) as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with concurrent.futures.ThreadPoolExecutor(REQUESTS_IN_FLIGHT) as pool:
      list(pool.map(lambda start: send(stub, start), range(0, len(pixels), IMAGES_PER_REQUEST)))


def rest_bodies(pixels: np.ndarray) -> list[bytes]:
  """The JSON bodies the REST job sends for `pixels`: as many images each as fit its limit."""
  # pylint: disable=import-outside-toplevel
  from beam_jobs.predict.backends.serving_base import DEFAULT_MAX_REQUEST_BYTES, plan_requests
  from beam_jobs.predict.backends.tf_serving_rest import image_bytes_within
  from model.serving.rest_tensors import columnar_request
  groups, _ = plan_requests(list(pixels), image_bytes_within(DEFAULT_MAX_REQUEST_BYTES),
                            IMAGES_PER_REQUEST)
  return [columnar_request({'images': pixels[group]}, 'serving_default') for group in groups]


def feed_server_rest(address: str, bodies: list[bytes]) -> None:
  """Pre-encoded JSON bodies to the REST API, 4 in flight, as fast as it answers."""
  import requests  # pylint: disable=import-outside-toplevel
  url = f'http://{address}/v1/models/PlanetModel:predict'
  with requests.Session() as session, concurrent.futures.ThreadPoolExecutor(
      REQUESTS_IN_FLIGHT) as pool:
    for answer in pool.map(lambda body: session.post(url, data=body, timeout=60), bodies):
      answer.raise_for_status()


def wire_bytes_per_image(pixels: np.ndarray, float_image: np.ndarray) -> dict:
  """Request bytes per image of each client, from its own encoder (see the module)."""
  # pylint: disable=import-outside-toplevel
  import json
  import tensorflow as tf
  from tensorflow_serving.apis import predict_pb2
  from model.serving.protocol import build_predict_request
  batch = pixels[:IMAGES_PER_REQUEST]
  tutorial = predict_pb2.PredictRequest()   # as benchmarks/baselines.py sends it
  tutorial.model_spec.name = 'PlanetModel'
  tutorial.model_spec.signature_name = 'predict_float'
  tutorial.inputs['input_image'].CopyFrom(
      tf.make_tensor_proto(float_image[None], dtype=tf.float32))
  tutorial_rest = json.dumps({'signature_name': 'predict_float',
                              'instances': [{'input_image': float_image.tolist()}]})
  return {
      'job_in_process': 0,
      'job_grpc': build_predict_request(list(batch)).ByteSize() / len(batch),
      'job_rest': sum(len(body) for body in rest_bodies(batch)) / len(batch),
      'float_client': tutorial.ByteSize(),
      'tutorial_rest_client': len(tutorial_rest.encode()),
  }


def _timed(function) -> float:
  started = time.perf_counter()
  function()
  return time.perf_counter() - started


def measure(plan: Plan, work: str, log=print) -> dict:
  # pylint: disable=import-outside-toplevel
  import tensorflow as tf
  from benchmarks.baselines import load_image, predict_one_float_image_per_request
  from beam_jobs.common.image_decoder import decode_image

  sets = {'small': workspace.chips(work, plan.small, draw_at_least=plan.big),
          'big': workspace.chips(work, plan.big)}
  version_dir = workspace.export(work)
  export_base = os.path.dirname(os.path.dirname(version_dir))
  paths = workspace.image_paths(sets['big'])[:plan.loop_images]
  blobs = []
  for path in paths:
    with open(path, 'rb') as f:
      blobs.append(f.read())
  pixels = np.stack([decode_image(b, workspace.IMAGE_SIZE) for b in blobs])
  signature = tf.saved_model.load(version_dir).signatures['serving_default']
  signature(images=tf.constant(pixels[:MODEL_BATCH]))  # traced once, as a warm server is

  def model_loop():
    for i in range(0, len(pixels), MODEL_BATCH):
      signature(images=tf.constant(pixels[i:i + MODEL_BATCH]))

  seconds = {k: [] for k in ('decode_only', 'plain_model_loop', 'float_client', 'server_limit',
                             'server_limit_rest')}
  bodies = rest_bodies(pixels)
  runs = {j: {'small': [], 'big': []} for j in JOBS}
  server_rss = []
  with ServerProcess(os.path.join(export_base, 'PlanetModel')) as server:
    predict_one_float_image_per_request(server.address, paths[:5], workspace.IMAGE_SIZE)  # warm
    feed_server(server.address, pixels[:IMAGES_PER_REQUEST * REQUESTS_IN_FLIGHT])
    feed_server_rest(server.rest_address, bodies[:REQUESTS_IN_FLIGHT])
    for repeat in range(plan.repeats):
      seconds['decode_only'].append(_timed(
          lambda: [decode_image(b, workspace.IMAGE_SIZE) for b in blobs]))
      seconds['plain_model_loop'].append(_timed(model_loop))
      seconds['float_client'].append(_timed(lambda: predict_one_float_image_per_request(
          server.address, paths, workspace.IMAGE_SIZE)))
      seconds['server_limit'].append(_timed(lambda: feed_server(server.address, pixels)))
      seconds['server_limit_rest'].append(_timed(
          lambda: feed_server_rest(server.rest_address, bodies)))
      log(f'  predict loops run {repeat + 1}: ' + ', '.join(
          f'{name} {len(paths) / values[-1]:.0f}' for name, values in seconds.items())
          + ' images/s')
      for job in JOBS:
        for size, chips in sets.items():
          out = os.path.join(work, 'runs', f'predict_{job}_{size}')
          shutil.rmtree(out, ignore_errors=True)
          run = commands.run_command(
              _job_command(job, os.path.join(chips, 'train-jpg'), out, export_base, server),
              in_process=plan.commands_in_process)
          runs[job][size].append(run)
          shutil.rmtree(out, ignore_errors=True)
          log(f'  predict {job:15s} {size:5s} run {repeat + 1}: {run.seconds:6.1f} s, '
              f'peak RSS {run.peak_rss_mb:6.0f} MB')
      server_rss.append(server.rss_mb())

  figures = {name: loop_figures(len(paths), values) for name, values in seconds.items()}
  decode = figures['decode_only']['images_per_s']
  model = figures['plain_model_loop']['images_per_s']
  figures['serial_limit'] = {'images_per_s': 1 / (1 / decode + 1 / model)}
  figures['model_batch'] = MODEL_BATCH
  figures['server_rss_mb'] = max(server_rss)
  figures['wire_bytes_per_image'] = wire_bytes_per_image(
      pixels, load_image(paths[0], workspace.IMAGE_SIZE))
  for job in JOBS:
    figures[job] = two_size_figures(plan, runs[job]['small'], runs[job]['big'])
    figures[job]['peak_rss_growth'] = ratio(figures[job]['peak_rss_mb_big'],
                                            figures[job]['peak_rss_mb_small'])
  loop = figures['plain_model_loop']['images_per_s']
  client = figures['float_client']['images_per_s']
  server = figures['server_limit']['images_per_s']
  in_process, grpc, rest = figures['job_in_process'], figures['job_grpc'], figures['job_rest']
  wire = figures['wire_bytes_per_image']
  figures['ratios'] = {
      'job_in_process_steady_vs_plain_loop': ratio(in_process['images_per_s_steady'], loop),
      'job_in_process_overall_vs_plain_loop': ratio(in_process['images_per_s_overall_big'], loop),
      'job_in_process_steady_vs_serial_limit': ratio(in_process['images_per_s_steady'],
                                                     figures['serial_limit']['images_per_s']),
      'job_grpc_steady_vs_plain_loop': ratio(grpc['images_per_s_steady'], loop),
      'job_grpc_steady_vs_server_limit': ratio(grpc['images_per_s_steady'], server),
      'server_limit_vs_float_client': ratio(server, client),
      'job_grpc_steady_vs_float_client': ratio(grpc['images_per_s_steady'], client),
      'job_grpc_overall_vs_float_client': ratio(grpc['images_per_s_overall_big'], client),
      'job_rest_steady_vs_grpc': ratio(rest['images_per_s_steady'], grpc['images_per_s_steady']),
      'job_rest_steady_vs_plain_loop': ratio(rest['images_per_s_steady'], loop),
      'job_rest_steady_vs_server_limit_rest': ratio(
          rest['images_per_s_steady'], figures['server_limit_rest']['images_per_s']),
      'rest_bytes_vs_grpc': ratio(wire['job_rest'], wire['job_grpc']),
  }
  return figures
