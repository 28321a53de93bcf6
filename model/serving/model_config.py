"""`--model_config_file` in TF Serving's text format: the model, its base path, versions and labels.

The file is a `tensorflow.serving.ModelServerConfig` (tensorflow_serving/config/
model_server_config.proto), as `tensorflow_model_server --model_config_file` reads it:

  model_config_list {
    config {
      name: "PlanetModel"
      base_path: "/srv/EXPORT/PlanetModel"
      model_platform: "tensorflow"
      model_version_policy { specific { versions: 1 versions: 2 } }   # or latest / all
      version_labels { key: "stable" value: 1 }
      version_labels { key: "canary" value: 2 }
    }
  }

The local server runs one model, so the list must hold exactly one config (a deliberate
difference); a label may point only at a version that is AVAILABLE when the file is read, as
ServerCore::UpdateModelVersionLabelMap requires (`ModelRepository.set_labels`).

Usage:
  config = read_model_config(text, where='models.config')
  repository = ModelRepository(config.base_path, config.name, config.version_policy)
"""
import dataclasses

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

__all__ = ['ServedModelConfig', 'VersionPolicy', 'read_model_config']


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
  """Which versions are served (ServableVersionPolicy): the `latest` N (TF Serving's default: 1),
  `all`, or `specific` ones."""
  kind: str = 'latest'
  num_versions: int = 1
  versions: tuple[int, ...] = ()

  def wants(self, version: int, newer_wanted: int) -> bool:
    """Whether `version` is served, given how many newer ones already are."""
    if self.kind == 'specific':
      return version in self.versions
    return self.kind == 'all' or newer_wanted < self.num_versions


@dataclasses.dataclass(frozen=True)
class ServedModelConfig:
  """The one model of a `--model_config_file`."""
  name: str
  base_path: str
  version_policy: VersionPolicy
  version_labels: dict


def read_model_config(text: str, where: str) -> ServedModelConfig:
  """The model a config file's text describes.

  Raises:
    ValueError: not TF Serving's text format, or not one TensorFlow model with a name and base
      path; the message names `where`.
  """
  try:
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
  except text_format.ParseError as error:
    raise ValueError(f'{where} is not a ModelServerConfig in text format: {error}') from None
  if config.WhichOneof('config') != 'model_config_list':
    raise ValueError(f'{where}: give a model_config_list (custom_model_config is not served here)')
  models = config.model_config_list.config
  if len(models) != 1:
    raise ValueError(f'{where} lists {len(models)} models; the local server serves exactly one '
                     '(tensorflow_model_server serves several)')
  (model,) = models
  if not model.name or not model.base_path:
    raise ValueError(f'{where}: the model config needs a name and a base_path')
  if model.model_platform not in ('', 'tensorflow'):
    raise ValueError(f'{where}: model_platform {model.model_platform!r} is not served here '
                     '(only "tensorflow")')
  choice = model.model_version_policy.WhichOneof('policy_choice')
  if choice == 'specific':
    if not model.model_version_policy.specific.versions:
      raise ValueError(f'{where}: model_version_policy specific lists no versions')
    policy = VersionPolicy('specific',
                           versions=tuple(model.model_version_policy.specific.versions))
  elif choice == 'all':
    policy = VersionPolicy('all')
  else:
    policy = VersionPolicy('latest', max(1, model.model_version_policy.latest.num_versions))
  return ServedModelConfig(model.name, model.base_path, policy, dict(model.version_labels))
