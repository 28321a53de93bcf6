"""The prediction job's inference backends and the result contract they share.

A backend is a Beam `ModelHandler` over uint8 `[H, W, 3]` images. For each image it yields a
`PredictionResult` whose `inference` is `prediction(weather, ground, version)`:
`{'weather': float32[4], 'ground': float32[13], 'model_version': str}`, and whose `model_id` is
`model_id(name, version)`; or whose `inference` is an `InputRefused` for an image it could not
predict (the job writes that one to its dead letters).

Backends:
  in_process.SavedModelHandler   the exported SavedModel, loaded in the worker (`--model_dir`)
  serving_base.ServingHandler    TensorFlow Serving (`--serving_address`): batching, retries
                                 (retry_policy), throttling and rows once, over a transport
                                 (transport.Transport); its start-up check is serving_check's
    tf_serving.ServingGrpcHandler       over gRPC (GrpcTransport)
    tf_serving_rest.ServingRestHandler  over the REST API (RestTransport, --serving_protocol rest)
"""
import numpy as np

from model import schema

__all__ = ['DEFAULT_MAX_BATCH_SIZE', 'model_id', 'prediction']

# 64 chips at 128 px are 3 MB of uint8: big enough to keep the CPU's matrix units busy, small
# enough that a worker's threads can each hold a batch. The in-process backend's --batch_size
# default (the TF Serving backends send RunInference batches of several requests: serving_base).
DEFAULT_MAX_BATCH_SIZE = 64


def prediction(weather: np.ndarray, ground: np.ndarray, version: str) -> dict:
  """The `inference` of one image's `PredictionResult`, as every backend returns it."""
  return {schema.OUTPUT_WEATHER: weather, schema.OUTPUT_GROUND: ground, 'model_version': version}


def model_id(model_name: str, version: str) -> str:
  """The `model_id` of a `PredictionResult`: `PlanetModel/<N>`."""
  return f'{model_name}/{version}'
