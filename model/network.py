"""The network: the original tutorial's two-headed CNN, behind one swappable function.

`build_model` wraps any feature extractor (`architecture`) with what every Planet model needs: a
`uint8` input that the model rescales itself, a `weather` softmax head over 4 labels and a
`ground` sigmoid head over 13. The float core is kept addressable (`model.get_layer(CORE_NAME)`)
so the export can offer the tutorial's float input too.
"""
from typing import Callable

import keras

from model import schema

__all__ = ['build_model', 'CORE_NAME', 'tutorial_cnn']

CORE_NAME = 'planet_core'


def tutorial_cnn(inputs):
  """The ML6 tutorial's feature extractor: 2 x (Conv 32 3x3 relu + MaxPool), 2 x (Dense 128 + Dropout)."""
  x = inputs
  for _ in range(2):
    x = keras.layers.Conv2D(32, 3, activation='relu')(x)
    x = keras.layers.MaxPooling2D()(x)
  x = keras.layers.Flatten()(x)
  for _ in range(2):
    x = keras.layers.Dense(128, activation='relu')(x)
    x = keras.layers.Dropout(0.2)(x)
  return x


def build_model(image_size: int = schema.DEFAULT_IMAGE_SIZE,
                architecture: Callable = tutorial_cnn) -> keras.Model:
  """Builds the full model: uint8 [batch, H, W, 3] -> {'weather': [batch, 4], 'ground': [batch, 13]}.

  Args:
    image_size: H = W, the resolution the decoder produces.
    architecture: float features from a float32 [batch, H, W, 3] tensor in [0, 1].
  """
  shape = (image_size, image_size, schema.CHANNELS)
  float_input = keras.Input(shape, dtype='float32', name=schema.INPUT_FLOAT)
  features = architecture(float_input)
  core = keras.Model(float_input, {
      schema.OUTPUT_WEATHER: keras.layers.Dense(
          schema.NUM_WEATHER, activation='softmax', name=schema.OUTPUT_WEATHER)(features),
      schema.OUTPUT_GROUND: keras.layers.Dense(
          schema.NUM_GROUND, activation='sigmoid', name=schema.OUTPUT_GROUND)(features),
  }, name=CORE_NAME)
  images = keras.Input(shape, dtype='uint8', name=schema.INPUT_IMAGES)
  # Pixels travel as uint8 (4x smaller than float32); the model owns its scaling.
  scaled = keras.layers.Rescaling(1.0 / 255.0, name='rescale')(images)
  return keras.Model(images, core(scaled), name=schema.MODEL_NAME)
