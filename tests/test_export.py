"""Exports: the signatures give the Keras model's outputs (TTA: their mean over the 8 flips and
rotations), and no partial version is ever visible."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from model import export as export_lib
from model import schema
from model.network import build_model

SIZE = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def model():
  keras.utils.set_random_seed(3)
  return build_model(SIZE)


def _images(count=5):
  return np.random.default_rng(0).integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)


def _assert_only_complete_versions(base):
  """Every entry TF Serving would load (a number) is complete: its checksums verify."""
  for name in os.listdir(base):
    if not name.isdigit():
      assert name.startswith('.'), f'{name} is neither a version nor a hidden temporary folder'
      continue
    version = os.path.join(base, name)
    sums = open(os.path.join(version, schema.EXPORT_CHECKSUMS_FILE)).read().split('\n')
    listed = dict(reversed(line.split('  ', 1)) for line in sums if line)
    on_disk = {os.path.relpath(os.path.join(root, f), version) for root, _, files in os.walk(version)
               for f in files} - {schema.EXPORT_CHECKSUMS_FILE}
    assert set(listed) == on_disk
    for relative, digest in listed.items():
      assert hashlib.sha256(open(os.path.join(version, relative), 'rb').read()).hexdigest() == digest


def test_both_signatures_give_the_keras_models_outputs(model, tmp_path):
  thresholds = [0.1 + 0.05 * i for i in range(schema.NUM_GROUND)]
  path = export_lib.export_model(model, str(tmp_path), {'ground_thresholds': thresholds,
                                                         'metrics': {'eval_mean_f2': 0.9}})
  assert path == os.path.join(str(tmp_path), 'PlanetModel', '1')
  loaded = tf.saved_model.load(path)
  images = _images()
  from_uint8 = loaded.signatures[schema.SERVING_SIGNATURE](
      **{schema.INPUT_IMAGES: tf.constant(images)})
  from_float = loaded.signatures[schema.FLOAT_SIGNATURE](
      **{schema.INPUT_FLOAT: tf.constant(images.astype(np.float32) / 255.0)})
  expected = model(images, training=False)
  for output in schema.OUTPUT_NAMES:
    np.testing.assert_allclose(from_uint8[output].numpy(), from_float[output].numpy(), atol=1e-6)
    np.testing.assert_allclose(from_uint8[output].numpy(), np.asarray(expected[output]), atol=1e-6)
  assert from_uint8[schema.OUTPUT_WEATHER].shape == (5, schema.NUM_WEATHER)
  assert from_uint8[schema.OUTPUT_GROUND].shape == (5, schema.NUM_GROUND)

  info = json.loads(open(os.path.join(path, schema.EXPORT_INFO_FILE)).read())
  assert info['weather_labels'] == list(schema.WEATHER_LABELS)
  assert info['ground_labels'] == list(schema.GROUND_LABELS)
  assert info['image_size'] == SIZE and info['version'] == 1
  assert info['ground_thresholds'] == thresholds and info['metrics'] == {'eval_mean_f2': 0.9}
  _assert_only_complete_versions(os.path.dirname(path))


def test_the_tta_signature_is_the_mean_over_the_8_flips_and_rotations(model, tmp_path):
  loaded = tf.saved_model.load(export_lib.export_model(model, str(tmp_path)))
  images = _images()
  views = [np.rot90(flipped, k, axes=(1, 2)) for flipped in (images, images[:, :, ::-1])
           for k in range(4)]
  tta = loaded.signatures[schema.TTA_SIGNATURE](**{schema.INPUT_IMAGES: tf.constant(images)})
  plain = loaded.signatures[schema.SERVING_SIGNATURE](**{schema.INPUT_IMAGES: tf.constant(images)})
  for output in schema.OUTPUT_NAMES:
    expected = np.mean([np.asarray(model(np.ascontiguousarray(view), training=False)[output])
                        for view in views], axis=0)
    np.testing.assert_allclose(tta[output].numpy(), expected, atol=1e-6)
    assert np.abs(tta[output].numpy() - plain[output].numpy()).max() > 1e-4   # not one view
  assert tta[schema.OUTPUT_GROUND].shape == (5, schema.NUM_GROUND)


def test_an_export_that_fails_part_way_leaves_no_trace(model, tmp_path, monkeypatch):
  export_lib.export_model(model, str(tmp_path))
  base = tmp_path / 'PlanetModel'

  def write_half_then_fail(version_dir):
    with open(os.path.join(version_dir, schema.EXPORT_CHECKSUMS_FILE), 'w') as f:
      f.write('deadbeef  saved_model.pb\n')
    assert sorted(os.listdir(base))[0].startswith('.tmp-')   # the version is being written aside
    raise OSError('No space left on device')

  monkeypatch.setattr(export_lib, '_write_checksums', write_half_then_fail)
  with pytest.raises(OSError, match='No space left'):
    export_lib.export_model(model, str(tmp_path))
  assert os.listdir(base) == ['1']
  monkeypatch.undo()
  assert export_lib.export_model(model, str(tmp_path)).endswith(os.path.join('PlanetModel', '2'))
  _assert_only_complete_versions(base)


_KILLED_EXPORTER = '''
import os, sys, time
os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'
from model import export, network
base, marker = sys.argv[1], sys.argv[2]
def stall(version_dir):
  open(marker, 'w').write(version_dir)   # the SavedModel is on disk, the checksums are not
  time.sleep(120)
export._write_checksums = stall
export.export_model(network.build_model(16), base)
'''


@pytest.mark.slow
def test_an_export_killed_mid_write_never_shows_a_version(model, tmp_path):
  export_lib.export_model(model, str(tmp_path))
  marker = tmp_path / 'writing'
  process = subprocess.Popen([sys.executable, '-c', _KILLED_EXPORTER, str(tmp_path), str(marker)],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 120
    while not marker.exists():
      assert process.poll() is None, process.stderr.read().decode()[-2000:]
      assert time.monotonic() < deadline, 'the exporter never reached the checksum step'
      time.sleep(0.1)
    half_written = marker.read_text()
    assert os.path.exists(os.path.join(half_written, 'saved_model.pb'))
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  base = str(tmp_path / 'PlanetModel')
  # The half-written SavedModel stays under its hidden temporary name: no version 2 appears.
  assert export_lib.list_versions(base) == [1]
  assert os.path.basename(half_written).startswith('.tmp-') and os.path.isdir(half_written)
  _assert_only_complete_versions(base)


def test_the_export_command_takes_thresholds_from_metrics_json(model, tmp_path):
  checkpoint = str(tmp_path / 'epoch_001.keras')
  model.save(checkpoint)
  thresholds = [0.3] * schema.NUM_GROUND
  metrics_json = tmp_path / 'metrics.json'
  metrics_json.write_text(json.dumps({
      'image_size': SIZE, 'ground_thresholds': thresholds, 'best_epoch': 1,
      'eval': {'mean_f2': 0.81, 'examples': 10, 'baseline': {'mean_f2': 0.6}}}))
  export_lib.main(['--checkpoint', checkpoint, '--export_base', str(tmp_path / 'export'),
                   '--info_json', str(metrics_json)])
  info = json.loads((tmp_path / 'export' / 'PlanetModel' / '1' / schema.EXPORT_INFO_FILE).read_text())
  assert info['ground_thresholds'] == thresholds
  assert info['metrics'] == {'eval_mean_f2': 0.81, 'eval_examples': 10, 'baseline_mean_f2': 0.6,
                             'best_epoch': 1}

  metrics_json.write_text(json.dumps({'image_size': SIZE, 'ground_thresholds': [0.3] * 12}))
  with pytest.raises(ValueError, match='no ground_thresholds list of 13 values'):
    export_lib.main(['--checkpoint', checkpoint, '--export_base', str(tmp_path / 'export'),
                     '--info_json', str(metrics_json)])
  metrics_json.write_text(json.dumps({'image_size': 64, 'ground_thresholds': thresholds}))
  with pytest.raises(ValueError, match='is for 64 px images'):
    export_lib.main(['--checkpoint', checkpoint, '--export_base', str(tmp_path / 'export'),
                     '--info_json', str(metrics_json)])
  assert export_lib.list_versions(str(tmp_path / 'export' / 'PlanetModel')) == [1]
