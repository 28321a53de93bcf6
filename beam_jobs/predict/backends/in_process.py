"""The in-process backend: a Beam ModelHandler that runs the exported SavedModel in the worker.

Beam's own TensorFlow handler cannot load a Keras 3 export (and needs tensorflow_hub), so this
one loads it with `tf.saved_model.load` and calls `serving_default` on uint8 batches. RunInference
keeps one loaded model per worker process, shared by its threads.

Results follow the backends' contract (`beam_jobs.predict.backends`): a `prediction(...)` per
example, or an `InputRefused` for an example that could not be predicted.
"""
import logging
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from beam_jobs.common.metrics import INFERENCE_BATCH_FALLBACKS, METRICS_NAMESPACE, counter
from beam_jobs.predict.backends import DEFAULT_MAX_BATCH_SIZE, model_id, prediction
from model import schema
from model.errors import InputRefused, Reason
from model.saved_model_info import ExportInfo

__all__ = ['LoadedExport', 'SavedModelHandler']


class LoadedExport:
  """The loaded SavedModel and its serving signature (Beam's shared cache needs a weak-referable
  object; the signature alone holds only weak references to the model's variables)."""

  def __init__(self, version_dir: str, signature: str = schema.SERVING_SIGNATURE):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    self.saved_model = tf.saved_model.load(version_dir)
    self.signature = self.saved_model.signatures[signature]

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outputs = self.signature(**{schema.INPUT_IMAGES: images})
    return outputs[schema.OUTPUT_WEATHER].numpy(), outputs[schema.OUTPUT_GROUND].numpy()


class SavedModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
  """Runs `serving_default` (or `signature`) of one export version on batches of uint8 [H, W, 3] images.

  Usage: `RunInference(KeyedModelHandler(SavedModelHandler(inspect_export(path))))`
  """

  def __init__(self, export: ExportInfo, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
               signature: str = schema.SERVING_SIGNATURE):
    # Full batches only (the last of a bundle excepted): Beam's adaptive sizing settled between
    # 20 and 50 images per call on 2 cores, each call costing the same Python overhead and the
    # model 5-10% more CPU per image than at 64.
    super().__init__(min_batch_size=max_batch_size, max_batch_size=max_batch_size)
    self._export = export
    self._signature = signature
    self._model_id = model_id(schema.MODEL_NAME, export.version)

  def load_model(self) -> LoadedExport:
    return LoadedExport(self._export.version_dir, self._signature)

  def run_inference(self, batch: Sequence[np.ndarray], model,
                    inference_args: Optional[dict[str, Any]] = None) -> Iterable[PredictionResult]:
    try:
      weather, ground = model(np.stack(batch))
    except Exception as e:  # pylint: disable=broad-except
      # One bad example must not take its batch down: retry them one by one.
      logging.warning('batch of %d failed (%s); predicting one by one', len(batch), e)
      counter(INFERENCE_BATCH_FALLBACKS).inc()
      yield from (self._predict_one(model, example) for example in batch)
      return
    version = self._export.version
    for i, example in enumerate(batch):
      yield PredictionResult(example, prediction(weather[i], ground[i], version), self._model_id)

  def _predict_one(self, model, example: np.ndarray) -> PredictionResult:
    try:
      weather, ground = model(example[None])
      return PredictionResult(example, prediction(weather[0], ground[0], self._export.version),
                              self._model_id)
    except Exception as e:  # pylint: disable=broad-except
      return PredictionResult(example, InputRefused(
          Reason.INFERENCE_FAILED, f'the model failed on this image: {type(e).__name__}: {e}'))

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(example.nbytes for example in batch)

  def get_metrics_namespace(self) -> str:
    return METRICS_NAMESPACE
