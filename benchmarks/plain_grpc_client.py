"""The opponent of the gRPC prediction job: the short concurrent client a user would write instead.

A thread pool decodes ahead with Pillow (which releases the GIL), 32 uint8 images go in each
PredictRequest (raw `tensor_content`), 4 requests are in flight (`stub.Predict.future`), and one
JSON line per image is written as answers come back. No retries, no dead letters, no report: the
fastest thing that gives the same predictions, to measure the job against.

Usage:
  python -m benchmarks.plain_grpc_client --images_dir DIR --address HOST:PORT --output FILE
      [--model_name PlanetModel] [--batch_size 32] [--in_flight 4]
  -> prints {"images": n, "seconds": s}
"""
import argparse
import collections
import concurrent.futures
import json
import os
import time

from model import command_line

if __name__ == '__main__':
  # The protos below load TensorFlow's C++ core, which logs as it loads; the job hides it the same way.
  command_line.quiet_third_party()

# pylint: disable=wrong-import-position,wrong-import-order
import grpc
import numpy as np
from PIL import Image
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def list_images(folder: str) -> list[str]:
  return sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                for name in names if name.lower().endswith(_EXTENSIONS))


def decode(path: str, size: int) -> np.ndarray:
  with Image.open(path) as image:
    image.draft('RGB', (size, size))
    return np.asarray(image.convert('RGB').resize((size, size), Image.Resampling.BOX))


def served_size(stub, model_name: str) -> int:
  """H of the served signature's `images` input, from GetModelMetadata."""
  request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=['signature_def'])
  request.model_spec.name = model_name
  signatures = get_model_metadata_pb2.SignatureDefMap()
  stub.GetModelMetadata(request, timeout=30).metadata['signature_def'].Unpack(signatures)
  return signatures.signature_def['serving_default'].inputs['images'].tensor_shape.dim[1].size


def predict_request(images: list[np.ndarray], model_name: str) -> predict_pb2.PredictRequest:
  batch = np.stack(images)
  tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8, tensor_content=batch.tobytes())
  for side in batch.shape:
    tensor.tensor_shape.dim.add(size=side)
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model_name
  request.model_spec.signature_name = 'serving_default'
  request.inputs['images'].CopyFrom(tensor)
  return request


def write_answers(out, names: list[str], response: predict_pb2.PredictResponse) -> None:
  outputs = {key: np.array(response.outputs[key].float_val, np.float32).reshape(len(names), -1)
             for key in ('weather', 'ground')}
  for i, name in enumerate(names):
    out.write(json.dumps({'image_name': name, 'weather': outputs['weather'][i].tolist(),
                          'ground': outputs['ground'][i].tolist()}) + '\n')


def run(images_dir: str, address: str, output: str, model_name: str, batch_size: int,
        in_flight: int) -> int:
  paths = list_images(images_dir)
  channel = grpc.insecure_channel(address, options=[('grpc.max_receive_message_length', -1)])
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  size = served_size(stub, model_name)
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  batches = [range(i, min(i + batch_size, len(paths))) for i in range(0, len(paths), batch_size)]
  lookahead = 2 * in_flight   # batches decoded ahead of the oldest request in flight
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool, \
      open(output, 'w', encoding='utf-8') as out:
    decoding = collections.deque()
    sent = collections.deque()
    next_batch = 0
    for batch in batches:
      while next_batch < len(batches) and len(decoding) < lookahead:
        decoding.append([pool.submit(decode, paths[i], size) for i in batches[next_batch]])
        next_batch += 1
      images = [future.result() for future in decoding.popleft()]
      if len(sent) >= in_flight:
        done_batch, future = sent.popleft()
        write_answers(out, [names[i] for i in done_batch], future.result())
      sent.append((batch, stub.Predict.future(predict_request(images, model_name), timeout=60)))
    for done_batch, future in sent:
      write_answers(out, [names[i] for i in done_batch], future.result())
  channel.close()
  return len(paths)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--images_dir', required=True)
  parser.add_argument('--address', required=True)
  parser.add_argument('--output', required=True)
  parser.add_argument('--model_name', default='PlanetModel')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--in_flight', type=int, default=4)
  args = parser.parse_args(argv)
  started = time.perf_counter()
  count = run(args.images_dir, args.address, args.output, args.model_name, args.batch_size,
              args.in_flight)
  print(json.dumps({'images': count, 'seconds': round(time.perf_counter() - started, 3)}))


if __name__ == '__main__':
  main()
