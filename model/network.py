"""The network: the original tutorial's two-headed CNN or a keras.applications backbone, behind
one swappable function, and the test-time augmentation the export offers.

`build_model` wraps any feature extractor (`architecture`) with what every Planet model needs: a
`uint8` input that the model rescales itself, a `weather` softmax head over 4 labels and a
`ground` sigmoid head over 13. The float core is kept addressable (`model.get_layer(CORE_NAME)`)
so the export can offer the tutorial's float input too: the core always takes float32 in [0, 1],
whatever the feature extractor wants (a preset converts [0, 1] to its backbone's own input).

Usage:
  model = build_model(128)                                    # the tutorial's CNN
  model = build_model(128, preset_features('mobilenet_v2', weights_path='mnv2_no_top.h5'))
  outputs = dihedral_mean(model, uint8_images)                # the 8 flips/rotations, averaged
"""
import dataclasses
from typing import Callable

import keras

from model import schema

__all__ = ['BACKBONE_NAME', 'BackbonePreprocess', 'build_model', 'CORE_NAME', 'dihedral_mean',
           'find_backbone', 'Preset', 'PRESETS', 'preset_features', 'tutorial_cnn']

CORE_NAME = 'planet_core'
# The keras.applications model inside a preset's core: what `--frozen_epochs` freezes.
BACKBONE_NAME = 'backbone'


def tutorial_cnn(inputs):
  """The ML6 tutorial's feature extractor, as its notebook builds it: 2 x (Conv 32 3x3 relu,
  padding 'same' + MaxPool 2x2, padding 'same'), Flatten, 2 x (Dense 128 relu + Dropout 0.2).

  With 'same' padding each block halves the side exactly: at 128 px the flatten has
  32 x 32 x 32 = 32,768 features (4.2 M weights into the first Dense layer).
  """
  x = inputs
  for _ in range(2):
    x = keras.layers.Conv2D(32, 3, activation='relu', padding='same')(x)
    x = keras.layers.MaxPooling2D(padding='same')(x)
  x = keras.layers.Flatten()(x)
  for _ in range(2):
    x = keras.layers.Dense(128, activation='relu')(x)
    x = keras.layers.Dropout(0.2)(x)
  return x


@dataclasses.dataclass(frozen=True)
class Preset:
  """A keras.applications backbone: how to build it and the input conversion it was trained with."""
  application: Callable          # keras.applications.X: the model builder
  module: object                 # its module, which holds its own `preprocess_input`


# --architecture names: MobileNetV2 (alpha 1.0, 2.3 M weights with the heads: small and fast) and
# ResNet50 (23.6 M: the ResNet class).
PRESETS = {
    'mobilenet_v2': Preset(keras.applications.MobileNetV2, keras.applications.mobilenet_v2),
    'resnet50': Preset(keras.applications.ResNet50, keras.applications.resnet50),
}


def _preset(name: str) -> Preset:
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}; known: {", ".join(PRESETS)}')
  return PRESETS[name]


@keras.saving.register_keras_serializable(package='planet')
class BackbonePreprocess(keras.layers.Layer):
  """The backbone's own `preprocess_input`, applied to the core's [0, 1] input scaled to [0, 255].

  A layer (not a Lambda) so that checkpoints save and load it by name; `preprocess_input` is the
  function keras.applications ships with each backbone (MobileNetV2: [-1, 1]; ResNet50: BGR with
  the ImageNet means subtracted), so pretrained weights see what they were trained on.
  """

  def __init__(self, preset: str, **kwargs):
    super().__init__(**kwargs)
    self._module = _preset(preset).module
    self.preset = preset

  def call(self, inputs):
    return self._module.preprocess_input(inputs * 255.0)

  def get_config(self):
    return {**super().get_config(), 'preset': self.preset}


def preset_features(preset: str, weights_path: str | None = None) -> Callable:
  """A feature extractor (for `build_model`) made of a keras.applications backbone.

  The backbone is built without its classifier (`include_top=False`), with global average
  pooling, and always with `weights=None`: nothing is downloaded at run time. `weights_path`, a
  weights file the user has (the application's `*_no_top.h5` from Keras, or a `.weights.h5`
  saved from such a backbone), is loaded into it afterwards.

  Raises:
    ValueError: an unknown preset.
  """
  application = _preset(preset).application

  def features(inputs):
    backbone = application(
        include_top=False, weights=None, input_shape=tuple(inputs.shape[1:]), pooling='avg',
        name=BACKBONE_NAME)
    if weights_path:
      backbone.load_weights(weights_path)
    return backbone(BackbonePreprocess(preset, name=f'{preset}_preprocess')(inputs))

  features.__name__ = preset
  return features


def find_backbone(model: keras.Model) -> keras.Model | None:
  """The preset backbone inside a model `build_model` made, or None (e.g. `tutorial_cnn`)."""
  core = model.get_layer(CORE_NAME)
  return next((layer for layer in core.layers if layer.name == BACKBONE_NAME), None)


def build_model(image_size: int = schema.DEFAULT_IMAGE_SIZE,
                architecture: Callable = tutorial_cnn) -> keras.Model:
  """Builds the full model: uint8 [batch, H, W, 3] -> {'weather': [batch, 4], 'ground': [batch, 13]}.

  Args:
    image_size: H = W, the resolution the decoder produces.
    architecture: float features from a float32 [batch, H, W, 3] tensor in [0, 1]
      (`tutorial_cnn`, `preset_features(...)` or the user's own).
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


def dihedral_mean(model: Callable, images):
  """The mean of `model`'s outputs over the 8 symmetries of the square (4 rotations, each with
  and without a flip) of a uint8 [batch, H, H, 3] batch: test-time augmentation.

  A chip has no up or left (training augments with the same 8 symmetries), so each transform is
  another view of the same ground; averaging their probabilities smooths the model's errors. The 8
  views go through the model as one batch of 8 x batch images, so TTA costs about 8x the compute
  of one prediction.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  views = []
  for flipped in (images, tf.reverse(images, axis=[2])):
    views += [tf.image.rot90(flipped, k) for k in range(4)]
  outputs = model(tf.concat(views, axis=0), training=False)
  # The 8 views' outputs are 8 equal slices, in the order of `views`.
  return {name: tf.add_n(tf.split(value, len(views))) / len(views)
          for name, value in outputs.items()}
