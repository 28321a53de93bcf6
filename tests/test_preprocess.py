"""Stage 1, beam_jobs.preprocess: conservation, round trip, splits, workers, Dataflow dry run.

The fixed-shard TFRecord sink (beam_jobs/common/tfrecord_sink.py) is tested here, through the job:
shard names, empty shards, gzip, two worker processes.
"""
import dataclasses
import io
import json
import os
import pathlib
import socket

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from beam_jobs import preprocess
from beam_jobs.common.dead_letters import TooManyBadInputs
from beam_jobs.common import tfrecord_sink
from beam_jobs.common.image_decoder import decode_image
from beam_jobs.common.labels import CsvFormat, LabelRow, parse_label_line
from beam_jobs.make_sample import make_sample
from beam_jobs.preprocess import ConfigError, EncodedExample, LabelledImage
from beam_jobs.preprocess import job as preprocess_job
from beam_jobs.preprocess import rules
from model import schema
from model.output_layout import OutputRefused
from tests.conftest import DATAFLOW_DRY_RUN_ARGS, REPO
from tests.hostile_inputs import png_declaring

GOOD = 12   # generated chips train_0 .. train_11

# Every kind of bad input, one each: (CSV line or None, file name or None, file bytes or None,
# the dead letters it must produce as (image_name, reason)). `{jpeg}` stands for a valid chip.
_BAD_INPUTS = [
    ('ghost_1,clear primary', None, None, [('ghost_1', 'MISSING_IMAGE')]),
    ('empty_1,clear primary', 'empty_1.jpg', b'', [('empty_1', 'EMPTY_FILE')]),
    ('text_1,clear primary', 'text_1.jpg', b'image_name,tags\n', [('text_1', 'NOT_AN_IMAGE')]),
    ('cut_1,clear primary', 'cut_1.jpg', 'half', [('cut_1', 'TRUNCATED_IMAGE')]),
    ('bomb_1,clear primary', 'bomb_1.jpg', 'bomb', [('bomb_1', 'TOO_MANY_PIXELS')]),
    ('typo_1,clear priamry', 'typo_1.jpg', 'jpeg', [('typo_1', 'UNKNOWN_TAG')]),
    ('notag_1,', 'notag_1.jpg', 'jpeg', [('notag_1', 'EMPTY_TAGS')]),
    ('twowx_1,clear haze primary', 'twowx_1.jpg', 'jpeg', [('twowx_1', 'MULTIPLE_WEATHER')]),
    ('../x,clear primary', None, None, [('../x', 'BAD_IMAGE_NAME')]),
    ('train_3,{train_3_tags}', None, None, [('train_3', 'DUPLICATE_NAME')]),    # identical
    ('train_4,cloudy', None, None, [('train_4', 'DUPLICATE_NAME')] * 2),        # conflicting
    ('broken_1,clear,primary,extra', 'broken_1.jpg', 'jpeg', [('broken_1', 'MALFORMED_ROW')]),
    (',clear primary', None, None, [('line:{line}', 'BAD_IMAGE_NAME')]),
    (None, 'orphan_1.jpg', 'jpeg', [('orphan_1', 'IMAGE_WITHOUT_ROW')]),
    ('nowx_1,primary water', 'nowx_1.jpg', 'jpeg', []),   # kept: all-zero weather
]


def _jpeg(seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 255, (256, 256, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, 'JPEG', quality=90)
  return buffer.getvalue()


@pytest.fixture(scope='module')
def bad_mix(tmp_path_factory):
  """12 good chips + one input of every bad kind; returns (folder, expected dead letters)."""
  root = tmp_path_factory.mktemp('bad_mix')
  rows = make_sample(str(root), GOOD, seed=3)
  images = root / 'train-jpg'
  tags = dict(rows)
  lines = (root / 'train_v2.csv').read_text().splitlines()
  expected = []
  for i, (line, file_name, data, letters) in enumerate(_BAD_INPUTS):
    if line is not None:
      lines.append(line.format(train_3_tags=' '.join(tags['train_3'])))
    if file_name is not None:
      payload = {'jpeg': _jpeg(i), 'half': _jpeg(i)[:3000], 'bomb': png_declaring(50_000, 50_000)}
      (images / file_name).write_bytes(payload.get(data, data))
    expected += [(name.format(line=len(lines)), reason) for name, reason in letters]
  # The conflicting duplicate also refuses train_4's original row.
  (root / 'train_v2.csv').write_text('\n'.join(lines) + '\n')
  return root, sorted(expected)


def _args(root: pathlib.Path, out: pathlib.Path, *extra: str) -> list[str]:
  return ['--labels_csv', str(root / 'train_v2.csv'), '--images_dir', str(root / 'train-jpg'),
          '--output_dir', str(out), *extra]


def _read_examples(out: pathlib.Path, manifest: dict) -> dict[str, dict]:
  """Every Example in the shards, read with tf.data, by image name (+ its split)."""
  import tensorflow as tf
  from model.tf_example import feature_spec
  spec = feature_spec(with_identity=True)
  compression = {'none': '', 'gzip': 'GZIP'}[manifest['compression']]
  examples = {}
  for split, shards in manifest['shards'].items():
    dataset = tf.data.TFRecordDataset([str(out / s) for s in shards], compression)
    for record in dataset.map(lambda r: tf.io.parse_single_example(r, spec)):
      name = record[schema.KEY_NAME].numpy().decode()
      assert name not in examples, f'{name} written twice'
      shape = tuple(record[schema.KEY_SHAPE].numpy())
      examples[name] = {
          'split': split, 'sha256': record[schema.KEY_SHA256].numpy().decode(),
          'pixels': np.frombuffer(record[schema.KEY_PIXELS].numpy(), np.uint8).reshape(shape),
          'weather': tuple(record[schema.KEY_WEATHER].numpy()),
          'ground': tuple(record[schema.KEY_GROUND].numpy())}
  return examples


def _read_dead_letters(out: pathlib.Path) -> list[dict]:
  records = []
  for path in sorted((out / schema.DEAD_LETTERS_DIR).glob('*.jsonl')):
    records += [json.loads(line) for line in path.read_text().splitlines()]
  return records


def _csv_rows(root: pathlib.Path) -> dict[str, LabelRow]:
  """The first good row per name of root/train_v2.csv, parsed independently of the job."""
  rows = {}
  for line in (root / 'train_v2.csv').read_text().splitlines()[1:]:
    try:
      row = parse_label_line(line, CsvFormat.KAGGLE)
    except ValueError:
      continue
    rows.setdefault(row.image_name, row)
  return rows


# ---- Pure functions -------------------------------------------------------------------------

def test_split_follows_the_worked_example_and_the_fraction():
  assert preprocess.assign_split('train_1', 0.2) == 'eval'     # sha256 prefix 0.0250
  assert preprocess.assign_split('train_0', 0.2) == 'train'    # sha256 prefix 0.4247
  assert preprocess.assign_split('train_0', 0.43) == 'eval'
  names = [f'train_{i}' for i in range(20_000)]
  at_20 = {n for n in names if preprocess.assign_split(n, 0.2) == 'eval'}
  at_30 = {n for n in names if preprocess.assign_split(n, 0.3) == 'eval'}
  assert abs(len(at_20) / len(names) - 0.2) < 0.01
  assert at_20 < at_30   # raising the fraction only moves images from train to eval


def test_shard_estimate_keeps_shards_between_100_and_200_mb():
  for rows, fraction in [(40_479, 0.8), (40_479, 0.2), (1_000_000, 0.8), (40_479, 1.0)]:
    shards = preprocess.estimate_num_shards(rows, 128, fraction)
    per_shard = rows * fraction * (128 * 128 * 3 + 256) / shards
    assert 100 * 2**20 < per_shard <= 200 * 2**20, (rows, fraction, shards)
  assert preprocess.estimate_num_shards(60, 128, 0.2) == 1


def test_raw_image_name_names_what_it_can():
  assert preprocess.raw_image_name(b'train_7,clear,too,many') == 'train_7'
  assert preprocess.raw_image_name(b'"a,b",clear') == 'a,b'
  assert preprocess.raw_image_name(b',clear') == ''
  assert preprocess.raw_image_name(b'\xff\xfe,x') == '\ufffd\ufffd'
  assert len(preprocess.raw_image_name(b'x' * 20_000)) == 255


def _row(name, weather=(1.0, 0.0, 0.0, 0.0), ground=(0.0,) * 13):
  return LabelRow(name, weather, ground)


def test_join_one_name_covers_every_case():
  join = preprocess.join_rows_with_image
  a, b = _row('a'), _row('a', weather=(0.0, 1.0, 0.0, 0.0))
  image, refused = join('a', [(5, a)], [], ['/i/a.jpg'], '/i/a.jpg')
  assert image == LabelledImage('a', 5, a, '/i/a.jpg') and refused == []
  # Identical duplicates: the first by line is kept, later ones refused.
  image, refused = join('a', [(9, a), (5, a)], [], ['/i/a.jpg'], '/i/a.jpg')
  assert image.line == 5 and [(r['line'], r['reason']) for r in refused] == [(9, 'DUPLICATE_NAME')]
  # Conflicting: all refused, and the file is not reported as having no row.
  image, refused = join('a', [(5, a), (9, b)], [], ['/i/a.jpg'], '/i/a.jpg')
  assert image is None and [r['line'] for r in refused] == [5, 9]
  assert {r['reason'] for r in refused} == {'DUPLICATE_NAME'}
  # A row without its file.
  image, refused = join('a', [(5, a)], [], [], '/i/a.jpg')
  assert image is None and refused[0]['reason'] == 'MISSING_IMAGE' and refused[0]['line'] == 5
  assert '/i/a.jpg' in refused[0]['message']
  # A file without any row: listed, but not a row (no line number).
  image, refused = join('a', [], [], ['/i/a.jpg'], '/i/a.jpg')
  assert image is None and refused[0]['reason'] == 'IMAGE_WITHOUT_ROW' and 'line' not in refused[0]
  # A file whose only row was refused while parsing: that row's dead letter accounts for it.
  assert join('a', [], [7], ['/i/a.jpg'], '/i/a.jpg') == (None, [])


def test_counts_from_tally_fill_every_label_and_check_conservation():
  tally = {'csv_rows': 3, 'examples/train': 1, 'examples/eval': 1, 'dead_lettered_rows': 1,
           'dead_letters/MISSING_IMAGE': 1, 'dead_letters/IMAGE_WITHOUT_ROW': 2,
           'images_without_rows': 2, 'labels/train/clear': 1, 'labels/eval/water': 1}
  counts, label_counts = preprocess.counts_from_tally(tally)
  assert counts == {'csv_rows': 3, 'examples': {'train': 1, 'eval': 1},
                    'dead_letters': {'IMAGE_WITHOUT_ROW': 2, 'MISSING_IMAGE': 1},
                    'dead_lettered_rows': 1, 'images_without_rows': 2, 'rows_without_weather': 0}
  assert list(label_counts['train']) == list(schema.ALL_LABELS)
  assert label_counts['train']['clear'] == 1 and label_counts['eval']['water'] == 1
  preprocess.check_conservation(counts)
  with pytest.raises(AssertionError, match='lost or duplicated'):
    preprocess.check_conservation({**counts, 'csv_rows': 4})


def test_tally_keys_of_examples_and_dead_letters():
  example = EncodedExample('eval', _row('a', weather=(0.0,) * 4, ground=(1.0,) + (0.0,) * 12), b'')
  assert preprocess.tally_example(example) == [
      'examples/eval', 'labels/eval/agriculture', 'rows_without_weather']
  assert preprocess.tally_dead_letter({'reason': 'IMAGE_WITHOUT_ROW'}) == [
      'dead_letters/IMAGE_WITHOUT_ROW', 'images_without_rows']
  assert preprocess.tally_dead_letter({'reason': 'EMPTY_FILE', 'line': 4}) == [
      'dead_letters/EMPTY_FILE', 'dead_lettered_rows']


def test_a_tally_key_and_its_counter_name_spell_one_fact():
  # The README documents both spellings: counts.json / the manifest, and the Beam counters.
  assert preprocess.tally_key('labels', 'train', 'partly_cloudy') == 'labels/train/partly_cloudy'
  assert preprocess.counter_name('labels/train/partly_cloudy') == 'labels_train_partly_cloudy'
  assert preprocess.counter_name('examples/eval') == 'examples_eval'
  assert preprocess.counter_name('dead_letters/MISSING_IMAGE') == 'dead_letters_MISSING_IMAGE'
  assert preprocess.counter_name('csv_rows') == 'csv_rows'


def test_image_to_example_hashes_and_decodes_the_same_bytes():
  import hashlib

  import tensorflow as tf
  data = _jpeg(0)
  example = tf.train.Example.FromString(preprocess.image_to_example(_row('a'), data, 64))
  feature = example.features.feature
  assert feature[schema.KEY_SHA256].bytes_list.value[0].decode() == hashlib.sha256(data).hexdigest()
  pixels = np.frombuffer(feature[schema.KEY_PIXELS].bytes_list.value[0], np.uint8)
  np.testing.assert_array_equal(pixels.reshape(64, 64, 3), decode_image(data, 64))


def test_the_fused_encoder_writes_in_input_order_and_refuses_with_the_reason(tmp_path):
  """EncodeAndWriteExamples' DoFn methods called as a runner calls them, with 4 threads."""
  import tensorflow as tf
  from apache_beam.utils.windowed_value import WindowedValue
  from beam_jobs.preprocess.encode import EncodeAndWriteExamples
  (tmp_path / 'images').mkdir()
  images = []
  for i in range(24):
    path = tmp_path / 'images' / f'img_{i}.jpg'
    path.write_bytes(b'not a jpeg' if i == 7 else _jpeg(i))
    images.append(LabelledImage(f'img_{i}', i + 2, _row(f'img_{i}'), str(path)))
  config = preprocess.PreprocessConfig(
      labels_csv='unused.csv', images_dir=str(tmp_path / 'images'),
      output_dir=str(tmp_path / 'out'), image_size=32,
      num_shards=(('train', 1), ('eval', 1)))
  parts_dirs = {split: str(tmp_path / f'parts_{split}') for split in schema.SPLITS}
  encoder = EncodeAndWriteExamples(config, parts_dirs, threads=4)
  encoder.setup()
  encoder.start_bundle()
  # Lists as the join gives them (a bucket's images), of sizes around the chunk size.
  outputs = [out for batch in (images[:5], images[5:21], images[21:]) for out in encoder.process(batch)]
  outputs += list(encoder.finish_bundle())
  encoder.teardown()
  tagged = [(getattr(o, 'tag', None), getattr(o, 'value', o)) for o in outputs]
  values = [(tag, v.value if isinstance(v, WindowedValue) else v) for tag, v in tagged]
  letters = [v for tag, v in values if tag == 'refused']
  assert [(r['image_name'], r['reason'], r['line'], r['step']) for r in letters] == [
      ('img_7', 'NOT_AN_IMAGE', 9, 'decode_image')]
  tally = dict(v for tag, v in values if tag == 'tally')
  parts = dict(v for tag, v in values if tag is None)
  good = [image for image in images if image.image_name != 'img_7']
  for split in schema.SPLITS:
    names = [tf.train.Example.FromString(r.numpy()).features.feature[
        schema.KEY_NAME].bytes_list.value[0].decode()
             for r in tf.data.TFRecordDataset([parts[split][1]])]
    expected = [i.image_name for i in good if preprocess.assign_split(i.image_name, 0.2) == split]
    assert names == expected                      # the input order, whatever the threads did
    assert tally[f'examples/{split}'] == len(expected)


@pytest.mark.parametrize('compression', schema.COMPRESSIONS)
def test_encoder_processes_write_owned_shards_whole_and_every_image_once(tmp_path, compression):
  """The same DoFn with encoder processes (started by its setup()): Examples are written by the
  processes, train's 2 shards each by the one process that owns it (one part each), eval's one
  shard by both in turn (a part each); only outcomes and part names come back."""
  import tensorflow as tf
  from apache_beam.utils.windowed_value import WindowedValue
  from beam_jobs.preprocess.encode import EncodeAndWriteExamples
  (tmp_path / 'images').mkdir()
  images = []
  for i in range(300):
    path = tmp_path / 'images' / f'img_{i}.jpg'
    path.write_bytes(b'not a jpeg' if i == 7 else _jpeg(i % 24))
    images.append(LabelledImage(f'img_{i}', i + 2, _row(f'img_{i}'), str(path)))
  config = preprocess.PreprocessConfig(
      labels_csv='unused.csv', images_dir=str(tmp_path / 'images'),
      output_dir=str(tmp_path / 'out'), image_size=32, compression=compression,
      num_shards=(('train', 2), ('eval', 1)), encoder_processes=2)
  parts_dirs = {split: str(tmp_path / f'parts_{split}') for split in schema.SPLITS}
  encoder = EncodeAndWriteExamples(config, parts_dirs)
  encoder.setup()
  encoder.start_bundle()
  outputs = [out for batch in (images[:100], images[100:]) for out in encoder.process(batch)]
  outputs += list(encoder.finish_bundle())
  encoder.teardown()
  tagged = [(getattr(o, 'tag', None), getattr(o, 'value', o)) for o in outputs]
  values = [(tag, v.value if isinstance(v, WindowedValue) else v) for tag, v in tagged]
  assert [(r['image_name'], r['reason']) for tag, r in values if tag == 'refused'] == [
      ('img_7', 'NOT_AN_IMAGE')]
  parts = [v for tag, v in values if tag is None]
  writers = {os.path.basename(path).split('.')[0].rsplit('-', 1)[1] for _, (_, path) in parts}
  assert len(writers) == 2 and str(os.getpid()) not in writers   # written by the 2 processes
  by_shard = {}
  for split, (shard, path) in parts:
    by_shard.setdefault((split, shard), []).append(path)
  assert sorted(len(paths) for key, paths in by_shard.items() if key[0] == 'train') == [1, 1]
  assert len(by_shard[('eval', 0)]) == 2
  written = {}
  for (split, shard), paths in by_shard.items():
    for record in tf.data.TFRecordDataset(paths, 'GZIP' if compression == 'gzip' else ''):
      name = tf.train.Example.FromString(record.numpy()).features.feature[
          schema.KEY_NAME].bytes_list.value[0].decode()
      assert name not in written
      written[name] = (split, shard)
  good = [image.image_name for image in images if image.image_name != 'img_7']
  assert sorted(written) == sorted(good)
  for name, (split, shard) in written.items():
    assert split == preprocess.assign_split(name, 0.2)
    assert shard == (rules.example_shard(name, 2) if split == 'train' else 0)
  tally = dict(v for tag, v in values if tag == 'tally')
  assert tally['examples/train'] + tally['examples/eval'] == len(good)


def test_an_encoder_process_that_dies_fails_the_bundle_instead_of_hanging(tmp_path):
  """A decoder crash kills its process: the batch it held fails the bundle (and so the job)
  with BrokenProcessPool, and nothing waits for an answer that will never come."""
  import signal
  from concurrent.futures.process import BrokenProcessPool
  from beam_jobs.preprocess.encode import EncodeAndWriteExamples
  (tmp_path / 'images').mkdir()
  images = []
  for i in range(200):
    path = tmp_path / 'images' / f'img_{i}.jpg'
    path.write_bytes(_jpeg(i % 24))
    images.append(LabelledImage(f'img_{i}', i + 2, _row(f'img_{i}'), str(path)))
  config = preprocess.PreprocessConfig(
      labels_csv='unused.csv', images_dir=str(tmp_path / 'images'),
      output_dir=str(tmp_path / 'out'), image_size=32, num_shards=(('train', 2), ('eval', 2)),
      encoder_processes=2)
  parts_dirs = {split: str(tmp_path / f'parts_{split}') for split in schema.SPLITS}
  encoder = EncodeAndWriteExamples(config, parts_dirs)
  encoder.setup()
  encoder.start_bundle()
  for executor in encoder._executors[:1]:  # pylint: disable=protected-access
    for process in executor._processes.values():  # pylint: disable=protected-access
      os.kill(process.pid, signal.SIGKILL)
  with pytest.raises(BrokenProcessPool):
    for _ in encoder.process(images):
      pass
    list(encoder.finish_bundle())


# ---- The fixed-shard TFRecord sink ------------------------------------------------------------

def test_publish_shards_writes_every_shard_and_each_record_once(tmp_path):
  import tensorflow as tf
  records = [f'record {i}'.encode() for i in range(3)]
  prefix = str(tmp_path / 'part')
  parts_dir = tfrecord_sink.parts_dir_for(prefix)
  writer = tfrecord_sink.ShardPartWriter(parts_dir, 'gzip')
  for shard, record in zip((1, 5, 5), records):
    writer.write(shard, record)
  with test_pipeline.TestPipeline() as p:
    written = (p | beam.Create(writer.close())
               | tfrecord_sink.PublishShards(prefix, 8, 'gzip', parts_dir))
    assert_that(written, equal_to([[tfrecord_sink.shard_path(prefix, shard, 8, 'gzip')
                                    for shard in range(8)]]))
  # 3 records in 8 shards: most shards are empty, and written all the same.
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      f'part-{shard:05d}-of-00008.tfrecord.gz' for shard in range(8)]
  read = tf.data.TFRecordDataset(sorted(str(p) for p in tmp_path.iterdir()), 'GZIP')
  assert sorted(r.numpy() for r in read) == records


@pytest.mark.parametrize('compression', schema.COMPRESSIONS)
def test_a_shard_is_its_one_part_renamed_or_its_parts_concatenated(tmp_path, compression):
  import tensorflow as tf
  rng = np.random.default_rng(5)
  # Incompressible records, 3 parts of ~2 MB: gzip members longer than tf.data's read buffer.
  bundles = [[rng.bytes(int(rng.integers(1, 20_000))) for _ in range(200)] for _ in range(3)]
  prefix, parts_dir = str(tmp_path / 'part'), str(tmp_path / 'parts')
  parts = []
  for records in bundles:
    writer = tfrecord_sink.ShardPartWriter(parts_dir, compression)
    for record in records:
      writer.write(0, record)
    parts += [path for _, path in writer.close()]
  assert len(parts) == 3
  tf_compression = {'none': '', 'gzip': 'GZIP'}[compression]

  def read(path):
    return [r.numpy() for r in tf.data.TFRecordDataset([path], tf_compression)]

  # The parts one after another, in the order of their (random) names.
  expected = [r for _, records in sorted(zip(parts, bundles)) for r in records]
  several = tfrecord_sink.publish_shard((0, parts + [None]), prefix, 3, compression)
  assert read(several) == expected
  assert not any(pathlib.Path(p).exists() for p in parts)
  # A retried step finds the parts gone and the shard there: the shard stays as it was.
  assert tfrecord_sink.publish_shard((0, parts), prefix, 3, compression) == several
  assert read(several) == expected

  writer = tfrecord_sink.ShardPartWriter(parts_dir, compression)
  writer.write(1, b'only')
  (_, part), = writer.close()
  one = tfrecord_sink.publish_shard((1, [part]), prefix, 3, compression)
  assert read(one) == [b'only'] and not pathlib.Path(part).exists()
  empty = tfrecord_sink.publish_shard((2, [None]), prefix, 3, compression)
  assert read(empty) == []
  assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
      pathlib.Path(tfrecord_sink.shard_path(prefix, shard, 3, compression)).name
      for shard in range(3)]


# ---- Configuration, refused before anything runs ----------------------------------------------

@pytest.mark.parametrize('change, message', [
    ({'--labels_csv': 'nowhere.csv'}, 'does not exist'),
    ({'--images_dir': 'nowhere'}, 'does not exist'),
    ({'--images_dir': 'EMPTY'}, 'holds no .jpg files'),
    ({'--labels_csv': 'BADHEADER'}, 'unrecognised labels CSV header'),
    ({'--eval_fraction': '0'}, '--eval_fraction must be between 0 and 1'),
    ({'--eval_fraction': '1'}, '--eval_fraction must be between 0 and 1'),
    ({'--max_bad_fraction': '1.5'}, '--max_bad_fraction must be between 0 and 1'),
    ({'--num_shards': '0'}, '--num_shards must be at least 1'),
    ({'--image_size': '0'}, '--image_size must be between'),
])
def test_bad_configuration_fails_before_the_pipeline(small_sample, tmp_path, change, message):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'bad.csv').write_text('name,labels\ntrain_0,clear\n')
  flags = dict(zip(*[iter(_args(small_sample, tmp_path / 'out'))] * 2))
  for flag, value in change.items():
    flags[flag] = {'EMPTY': str(tmp_path / 'empty'), 'BADHEADER': str(tmp_path / 'bad.csv'),
                   'nowhere': str(tmp_path / 'nowhere'),
                   'nowhere.csv': str(tmp_path / 'nowhere.csv')}.get(value, value)
  with pytest.raises(ConfigError, match=message):
    preprocess.run([x for pair in flags.items() for x in pair])
  assert not (tmp_path / 'out').exists()


# ---- The pipeline on a TestPipeline -----------------------------------------------------------

@pytest.mark.parametrize('join_buckets', [1, 5])
def test_pipeline_routes_every_bad_input_to_its_dead_letter(bad_mix, tmp_path, join_buckets):
  root, expected = bad_mix
  config, _ = preprocess.validate_config(preprocess.parse_args(_args(root, tmp_path))[0])
  # One bucket (this small CSV's own), and several: a duplicate, a refused line and a file
  # without a row each meet their name's other inputs in its bucket, whichever it is.
  config = dataclasses.replace(config, join_buckets=join_buckets)
  good = [f'train_{i}' for i in range(GOOD) if i != 4] + ['nowx_1']
  with test_pipeline.TestPipeline() as p:
    outputs = preprocess.build_pipeline(p, config)
    assert_that(outputs.dead_letters | 'AllDeadLetters' >> beam.Flatten()
                | beam.Map(lambda r: (r['image_name'], r['reason'])),
                equal_to(expected), label='CheckDeadLetters')
    for split in schema.SPLITS:
      assert_that(outputs.shards[split], equal_to([[str(tmp_path / split /
                                                          'part-00000-of-00001.tfrecord')]]),
                  label=f'Check{split}Shards')
  shards = {split: [f'{split}/part-00000-of-00001.tfrecord'] for split in schema.SPLITS}
  examples = _read_examples(tmp_path, {'compression': 'none', 'shards': shards})
  assert sorted((n, e['split']) for n, e in examples.items()) == sorted(
      (n, preprocess.assign_split(n, 0.2)) for n in good)
  counts = json.loads((tmp_path / schema.COUNTS_FILE).read_text())
  assert counts['csv_rows'] == len(good) + sum(r != 'IMAGE_WITHOUT_ROW' for _, r in expected)


def test_bucket_batches_let_go_full_lists_and_hold_at_most_max_held_items():
  from beam_jobs.common.buckets import BucketBatcher, unpack_batch
  batches = BucketBatcher(batch=3, max_held=5, packed=True)
  out = []
  for i in range(20):
    out += [(bucket, unpack_batch(packed)) for bucket, packed in batches.add(i % 4, i)]
    let_go = sum(len(items) for _, items in out)
    assert i + 1 - let_go < 5                                       # never 5 items held
  out += [(bucket, unpack_batch(packed)) for bucket, packed in batches.drain()]
  items = sorted(item for _, items in out for item in items)
  assert items == list(range(20))                                   # each item exactly once
  assert all(all(item % 4 == bucket for item in items) for bucket, items in out)
  assert max(len(items) for _, items in out) <= 3
  assert list(BucketBatcher().drain()) == []


def test_join_buckets_grow_with_the_csv_and_a_name_has_one_bucket_everywhere():
  from beam_jobs.common.buckets import name_bucket
  assert [rules.join_buckets(rows) for rows in (0, 1, 1000, 1001, 50_000)] == [1, 1, 1, 2, 50]
  assert rules.join_buckets(None) >= 100       # a dry run that did not read the CSV
  names = ['train_0', '=1,2 "x"', 'été', '\udcff-undecodable']
  assert [name_bucket(n, 7) for n in names] == [name_bucket(n, 7) for n in names]
  assert len({name_bucket(f'train_{i}', 50) for i in range(2000)}) == 50


# ---- The whole job ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def mixed_run(bad_mix, tmp_path_factory):
  """The job, in-process, on the bad mix (whose bad share is far above the default limit)."""
  root, _ = bad_mix
  out = tmp_path_factory.mktemp('mixed_run')
  return out, preprocess.run(_args(root, out, '--max_bad_fraction', '0.9'))


def test_every_row_is_an_example_or_a_dead_letter_and_all_reports_agree(bad_mix, mixed_run):
  root, expected = bad_mix
  out, outcome = mixed_run
  manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
  assert manifest == json.loads(json.dumps(outcome.manifest))
  counts = manifest['counts']
  examples = _read_examples(out, manifest)
  letters = _read_dead_letters(out)
  row_letters = [r for r in letters if r['reason'] != 'IMAGE_WITHOUT_ROW']
  csv_lines = len((root / 'train_v2.csv').read_text().splitlines()) - 1

  # Conservation, exactly, in the files themselves.
  assert counts['csv_rows'] == csv_lines == len(examples) + len(row_letters)
  assert counts['examples'] == {s: sum(e['split'] == s for e in examples.values())
                                for s in schema.SPLITS}
  assert counts['dead_lettered_rows'] == len(row_letters) == 14
  assert sorted((r['image_name'], r['reason']) for r in letters) == expected
  assert counts['images_without_rows'] == 1 and counts['rows_without_weather'] == 1
  assert sum(counts['dead_letters'].values()) == len(letters)
  # Every dead letter says what, why, where; a row's says its line.
  for record in letters:
    assert record['stage'] == schema.STAGE_PREPROCESS and record['message'] and record['step']
    assert ('line' in record) == (record['reason'] != 'IMAGE_WITHOUT_ROW')
  conflict = (root / 'train_v2.csv').read_text().splitlines().index('train_4,cloudy') + 1
  assert {r['line'] for r in row_letters if r['image_name'] == 'train_4'} == {6, conflict}

  # The counters say the same numbers.
  counters = outcome.counters
  assert counters['csv_rows'] == counts['csv_rows']
  assert counters['dead_lettered_rows'] == counts['dead_lettered_rows']
  assert counters['images_without_rows'] == counts['images_without_rows']
  assert counters['rows_without_weather'] == counts['rows_without_weather']
  for split in schema.SPLITS:
    assert counters[f'examples_{split}'] == counts['examples'][split]
    for label, n in manifest['label_counts'][split].items():
      assert counters.get(f'labels_{split}_{label}', 0) == n
  for reason, n in counts['dead_letters'].items():
    assert counters[f'dead_letters_{reason}'] == n

  # The manifest's contract with the training stage.
  assert manifest['stage'] == schema.STAGE_PREPROCESS and manifest['image_size'] == 128
  assert manifest['compression'] == 'none'
  assert all(not p.startswith('/') and (out / p).is_file()
             for split in schema.SPLITS for p in manifest['shards'][split])
  import hashlib
  assert manifest['inputs']['labels_csv_sha256'] == hashlib.sha256(
      (root / 'train_v2.csv').read_bytes()).hexdigest()


def test_shards_hold_the_decoders_pixels_and_the_rows_labels(bad_mix, mixed_run):
  root, _ = bad_mix
  out, outcome = mixed_run
  examples = _read_examples(out, outcome.manifest)
  rows = _csv_rows(root)
  for name, example in examples.items():
    data = (root / 'train-jpg' / f'{name}.jpg').read_bytes()
    np.testing.assert_array_equal(example['pixels'], decode_image(data, 128))
    assert example['weather'] == rows[name].weather and example['ground'] == rows[name].ground
    assert example['split'] == preprocess.assign_split(name, 0.2)
  assert examples['nowx_1']['weather'] == (0.0,) * 4


@pytest.mark.parametrize('mode', ['threads',
                                  pytest.param('beam_worker_processes', marks=pytest.mark.slow)])
def test_encoder_processes_write_the_same_examples_as_threads_and_beams_workers(
    bad_mix, mixed_run, tmp_path, mode):
  """The default local run forks an encoder process per core (mixed_run); threads in one
  process (--direct_num_workers=1) and Beam's own worker processes give the same outputs."""
  root, _ = bad_mix
  out, outcome = mixed_run
  cores = len(os.sched_getaffinity(0))
  mode_args = {'threads': ['--direct_num_workers=1'],
               'beam_worker_processes': ['--direct_running_mode=multi_processing',
                                         '--direct_num_workers=2']}[mode]
  other = preprocess.run(_args(root, tmp_path, '--max_bad_fraction', '0.9', *mode_args))

  def summary(directory, manifest):
    examples = {n: (e['split'], e['sha256'], e['pixels'].tobytes(), e['weather'], e['ground'])
                for n, e in _read_examples(directory, manifest).items()}
    letters = sorted(json.dumps(r, sort_keys=True) for r in _read_dead_letters(directory))
    return examples, letters, manifest['counts'], manifest['label_counts']

  assert summary(tmp_path, other.manifest) == summary(out, outcome.manifest)
  assert other.counters['csv_rows'] == outcome.manifest['counts']['csv_rows']
  # A split this small has one shard, whoever writes it (its parts concatenated).
  assert outcome.manifest['options']['num_shards'] == other.manifest['options']['num_shards'] == {
      'train': 1, 'eval': 1}
  assert preprocess_job.encoder_process_count(
      PipelineOptions([]), [], preprocess.validate_config(preprocess.parse_args(
          _args(root, tmp_path))[0])[0]) == (cores if cores > 1 else 0)


def test_encoder_processes_only_for_a_local_run_in_this_process_on_local_files(tmp_path):
  config = preprocess.PreprocessConfig(labels_csv='x.csv', images_dir=str(tmp_path),
                                       output_dir=str(tmp_path / 'out'))
  cores = len(os.sched_getaffinity(0))
  count = preprocess_job.encoder_process_count

  def options(*args):
    return PipelineOptions(list(args)), list(args)

  assert count(*options(), config) == (cores if cores > 1 else 0)
  assert count(*options('--direct_num_workers=3'), config) == 3
  assert count(*options('--direct_num_workers=1'), config) == 0
  assert count(*options('--direct_running_mode=multi_processing'), config) == 0
  assert count(*options('--runner=DataflowRunner', '--project=p'), config) == 0
  remote = dataclasses.replace(config, output_dir='gs://bucket/out')
  assert count(*options('--direct_num_workers=3'), remote) == 0
  assert count(*options('--runner=PortableRunner'), config) == 0


@pytest.mark.slow
def test_too_many_bad_rows_fail_unpublished_and_reruns_never_mix_shards(bad_mix, tmp_path):
  root, _ = bad_mix
  with pytest.raises(TooManyBadInputs, match=r'14 of \d+ CSV rows .*dead_letters'):
    preprocess.run(_args(root, tmp_path, '--num_shards', '3'))
  assert not (tmp_path / schema.MANIFEST_FILE).exists()
  assert len(list((tmp_path / 'train').glob('*-of-00003.tfrecord'))) == 3   # left unpublished

  # A rerun is refused until told to delete the unfinished run's files, then clears its
  # shards: -of-00003 never sits beside -of-00002.
  with pytest.raises(OutputRefused, match='unfinished run .*--overwrite'):
    preprocess.run(_args(root, tmp_path, '--num_shards', '2', '--max_bad_fraction', '0.9'))
  assert len(list((tmp_path / 'train').glob('*-of-00003.tfrecord'))) == 3
  manifest = preprocess.run(_args(root, tmp_path, '--num_shards', '2', '--overwrite',
                                  '--max_bad_fraction', '0.9')).manifest
  assert sorted(p.name for p in (tmp_path / 'train').iterdir()) == [
      'part-00000-of-00002.tfrecord', 'part-00001-of-00002.tfrecord']
  assert manifest['shards']['train'] == [f'train/part-0000{i}-of-00002.tfrecord' for i in (0, 1)]

  # A finished output is refused without --overwrite, and left as it was.
  before = (tmp_path / schema.MANIFEST_FILE).read_bytes()
  with pytest.raises(OutputRefused, match='finished run .*--overwrite'):
    preprocess.run(_args(root, tmp_path, '--max_bad_fraction', '0.9'))
  assert (tmp_path / schema.MANIFEST_FILE).read_bytes() == before

  # --overwrite replaces it whole; gzip shards read back the same.
  gzipped = preprocess.run(_args(root, tmp_path, '--overwrite', '--compression', 'gzip',
                                 '--max_bad_fraction', '0.9')).manifest
  assert gzipped['compression'] == 'gzip'
  assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob('*/*.tfrecord*')) == sorted(
      gzipped['shards']['train'] + gzipped['shards']['eval'])
  assert all(p.endswith('.tfrecord.gz') for p in gzipped['shards']['train'])
  assert len(_read_examples(tmp_path, gzipped)) == gzipped['counts']['examples']['train'] + \
      gzipped['counts']['examples']['eval']


def test_planet_chips_in_both_csv_formats_come_out_in_colour(planet_dir, planet_chips, tmp_path):
  names = [p.stem for p in planet_chips]
  for csv_name in ('train_v2.csv', 'KagglePlanetMCML.csv'):
    lines = (planet_dir / csv_name).read_text().splitlines()
    picked = [lines[0]] + [l for l in lines[1:] if l.split(',', 1)[0] in names]
    (tmp_path / csv_name).write_text('\n'.join(picked) + '\n')
  kaggle = _csv_rows(tmp_path)   # the labels, as the Kaggle CSV says them
  for csv_name in ('train_v2.csv', 'KagglePlanetMCML.csv'):
    out = tmp_path / csv_name.replace('.csv', '')
    manifest = preprocess.run(['--labels_csv', str(tmp_path / csv_name),
                               '--images_dir', str(planet_dir / 'train-jpg'),
                               '--output_dir', str(out)]).manifest
    assert manifest['counts']['csv_rows'] == 6 and manifest['counts']['dead_lettered_rows'] == 0
    examples = _read_examples(out, manifest)
    assert sorted(examples) == sorted(names)
    for path in planet_chips:
      example = examples[path.stem]
      np.testing.assert_array_equal(example['pixels'], decode_image(path.read_bytes(), 128))
      assert example['pixels'].mean() > 20, f'{path.stem} came out (nearly) black'
      assert example['weather'] == kaggle[path.stem].weather
      assert example['ground'] == kaggle[path.stem].ground


# ---- Dataflow ---------------------------------------------------------------------------------

def test_dataflow_dry_run_translates_the_job_without_touching_the_network(
    bad_mix, tmp_path, monkeypatch):
  root, _ = bad_mix

  def no_network(*args, **kwargs):
    raise AssertionError(f'a dry run touched the network: {args}')
  monkeypatch.setattr(socket.socket, 'connect', no_network)
  monkeypatch.setattr(socket, 'create_connection', no_network)
  monkeypatch.chdir(REPO)   # --setup_file=./setup.py, as a user runs it
  outcome = preprocess.run(_args(root, 'gs://my-bucket/out') + DATAFLOW_DRY_RUN_ARGS)
  assert outcome.manifest is None
  job = outcome.pipeline_result.job
  transforms = job.proto_pipeline.components.transforms.values()
  top_level = {t.unique_name for t in transforms if '/' not in t.unique_name}
  assert {'ReadLabels', 'ListImages', 'JoinRowsWithImages', 'EncodeExamples', 'SplitTrainEval',
          'WriteTrain', 'WriteEval', 'WriteDeadLetters', 'WriteCounts'} <= top_level
  from apache_beam.portability.api import beam_runner_api_pb2
  patterns = set()
  for transform in transforms:
    for item in transform.display_data:
      payload = beam_runner_api_pb2.LabelledPayload.FromString(item.payload)
      if payload.label == 'File Pattern':
        patterns.add(payload.string_value)
  assert 'gs://my-bucket/out/train/part-%(shard_num)05d-of-%(num_shards)05d.tfrecord' in patterns
  assert 'gs://my-bucket/out/counts.json' in patterns
  staged = {d.role_payload for env in job.proto_pipeline.components.environments.values()
            for d in env.dependencies}
  assert any(b'workflow.tar.gz' in p for p in staged), 'the setup.py package was not built'
  assert not (REPO / 'gs:').exists()


def test_an_empty_split_has_no_parts_folder_to_complain_about(tmp_path, caplog):
  from beam_jobs.common.tfrecord_sink import delete_parts_dir, parts_dir_for
  caplog.set_level('INFO', logger='planet.part_files')
  never_made = parts_dir_for(str(tmp_path / 'eval' / 'part'))   # no bundle wrote a part
  assert delete_parts_dir(None, never_made, ['b', 'a']) == ['a', 'b']
  assert not caplog.records                                      # no 'could not delete'
  made = pathlib.Path(parts_dir_for(str(tmp_path / 'train' / 'part')))
  made.mkdir(parents=True)
  assert delete_parts_dir(None, str(made), []) == [] and not made.exists()
