"""Bulk prediction: image folders -> predictions, submission.csv, dead letters, summary, report.

Stage 4 of the flow (preprocess -> train -> export -> predict): runs an exported model, in the
worker or through TensorFlow Serving, over every image below the --input folders.

Usage:
  python -m beam_jobs.predict --input DIR_OR_GLOB [--input ...] --output_dir OUT \
      --model_dir EXPORT/PlanetModel[/N] [--labels_csv CSV] [Beam pipeline options]
  python -m beam_jobs.predict ... --serving_address HOST:PORT [--model_name PlanetModel]
  python -m beam_jobs.predict ... --previous_output OUT_PREV    # predict only what changed
  python -m beam_jobs.predict ... --resume                      # continue a killed run in OUT

  summary = beam_jobs.predict.run(['--input', DIR, '--output_dir', OUT, '--model_dir', EXPORT])

One image, keyed by its name (the file stem) from the match to the last write:

  images/a/chip_7.jpg                 matched by --input (config.image_source)
  -> ('chip_7', path)                 one path per name (rows.pick_path); the others are
                                      DUPLICATE_NAME dead letters
  [-> ('chip_7', (path, sha256))       with earlier rows (--previous_output, --resume): joined
                                      by name with them; an unchanged image's row is reused
                                      and it stops here (carry_over, incremental)]
  -> (('chip_7', path, sha256), pixels) read and decoded at the model's size (ReadAndDecode)
  -> PredictionResult                 RunInference with a backend (backends/), or InputRefused
  -> prediction row                   {'image_name', 'path', 'weather', 'ground', 'tags',
                                      'model_name', 'model_version', 'sha256'} (rows.result_row),
                                      also kept in OUT/completed/ for --resume (completed_rows)
  -> its lines in the outputs         a line of predictions-*.jsonl, a line of submission.csv
                                      (submission: sorted in ordered name buckets, never all
                                      lines in one place), and its share of summary.json
                                      (stats) and report.html (report_html)

An image that cannot be read, decoded or predicted becomes one line of
dead_letters/dead_letters-*.jsonl with a reason code instead, so matched = predictions + dead
letters. The job fails after the run, publishing nothing, when more than --max_bad_fraction of
the images are dead letters; otherwise it writes manifest.json last.

Modules: config (flags, checks, backend), rows (pure row logic), pipeline (DoFns and the graph),
submission (submission.csv from ordered name buckets),
incremental (which earlier rows are reused: pure) and carry_over (its join), completed_rows
(kept work for --resume), stats (summary.json), thumbnails, report_html and report_incremental
(report.html), backends/ (the model handlers), job (`run` and `main`).
"""
from beam_jobs.predict.config import (LAYOUT, Backend, JobConfig, check_inputs, check_labels_csv,
                                      image_source, make_backend, parse_args)
from beam_jobs.predict.job import main, run
from beam_jobs.predict.pipeline import build_pipeline
from beam_jobs.predict.rows import (ThresholdsByVersion, image_name, pick_path, result_row,
                                    spreadsheet_safe)

__all__ = ['LAYOUT', 'Backend', 'JobConfig', 'ThresholdsByVersion', 'build_pipeline',
           'check_inputs', 'check_labels_csv', 'image_name', 'image_source', 'main',
           'make_backend', 'parse_args', 'pick_path', 'result_row', 'run', 'spreadsheet_safe']
