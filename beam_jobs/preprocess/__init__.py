"""Stage 1: labels CSV + JPEG folder -> train/eval TFRecord shards, dead letters and a manifest.

Usage:
  python -m beam_jobs.preprocess --labels_csv CSV --images_dir DIR --output_dir OUT \
      [--image_size 128] [--eval_fraction 0.2] [--num_shards N] [--compression none|gzip] \
      [--max_bad_fraction 0.05] [--max_file_bytes N] [--overwrite] [Beam pipeline options]

The same code runs on DirectRunner (in-process, or `--direct_running_mode=multi_processing
--direct_num_workers=N`) and on Dataflow (`--runner=DataflowRunner --project ... --region ...
--temp_location gs://... --setup_file ./setup.py`). Every path may be local or gs://.

One CSV row on its way to an Example (pipeline.build_pipeline; the rules are plain functions):
  1. ReadLabels: the CSV, read by one worker in file order, gives (name, line, LabelRow) in
     lists by join bucket (buckets.name_bucket); a line that does not parse is a dead letter at
     its line (rules.raw_image_name).
  2. ListImages: every <images_dir>/*.jpg as (name, path), in lists by join bucket.
  3. JoinRowsWithImages: rows and files grouped by bucket, then by name within it; the
     duplicate rule and the row-file join (rules.join_rows_with_image) give one LabelledImage,
     or dead letters (MISSING_IMAGE, DUPLICATE_NAME, IMAGE_WITHOUT_ROW).
  4. EncodeExamples (encode.py): one fused step per bundle: each file read once (bounded),
     hashed and decoded (rules.image_to_example), its split and its shard from its name
     (rules.assign_split, rules.example_shard), and the Example written straight into a part
     file of that shard: on a local run by the encoder processes the DoFn starts in setup()
     (encoder_processes.py, --encoder_processes), each writing its own parts; elsewhere on a
     thread pool of one thread per core. A file that cannot be used is a dead letter with the reason. Only part
     names, dead letters and (key, count) tallies leave it.
  5. WriteTrain / WriteEval: the part names grouped by shard; a shard is its one part renamed
     (a local run: every byte written once) or its parts' bytes concatenated, compressed as
     written (beam_jobs/common/tfrecord_sink.py); every shard exists, an empty one too.
     WriteDeadLetters; WriteCounts: the tallies summed by key (rules.tally_example,
     rules.tally_dead_letter, the CSV's row count).
  Then the driver (job.run) checks conservation and --max_bad_fraction and publishes the manifest
  (publish.py).

Outputs under OUT:
  train/part-SSSSS-of-NNNNN.tfrecord[.gz]   eval/...   one Example per good image (model/schema.py)
  dead_letters/dead_letters-00000-of-00001.jsonl      one JSON line per input that is not an Example
  counts.json                                          the pipeline's own tally of everything
  manifest.json                                        written last, only when the job succeeded
  .planet-claim.json                                   written first: the folder is this job's

The output folder may hold nothing but these (see model/output_dir.py): a folder with other files,
or one that overlaps --images_dir or --labels_csv, is refused before anything is touched.

Every CSV row ends up exactly once as an Example or as a dead letter, so
csv_rows = examples[train] + examples[eval] + dead_lettered_rows, and the job checks it.

Modules: config (flags, validation), rules (pure functions), encode (the fused read-decode-write
step), encoder_processes (a local run's processes for it), pipeline (DoFns, transforms, the graph), publish (output folder, manifest, summary), job
(the driver).
"""
from beam_jobs.preprocess.config import (ConfigError, CsvFacts, PreprocessConfig, parse_args,
                                         validate_config)
from beam_jobs.preprocess.job import RunOutcome, main, run
from beam_jobs.preprocess.pipeline import PreprocessOutputs, build_pipeline
from beam_jobs.preprocess.rules import (EncodedExample, LabelledImage, assign_split,
                                        check_conservation, counter_name, counts_from_tally,
                                        estimate_num_shards, image_to_example,
                                        join_rows_with_image, raw_image_name, tally_dead_letter,
                                        tally_example, tally_key)

__all__ = ['ConfigError', 'CsvFacts', 'EncodedExample', 'LabelledImage', 'PreprocessConfig',
           'PreprocessOutputs', 'RunOutcome', 'assign_split', 'build_pipeline',
           'check_conservation', 'counter_name', 'counts_from_tally', 'estimate_num_shards',
           'image_to_example', 'join_rows_with_image', 'main', 'parse_args', 'raw_image_name',
           'run', 'tally_dead_letter', 'tally_example', 'tally_key', 'validate_config']
