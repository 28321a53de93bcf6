"""The prediction job's driver: flags -> checks -> the pipeline -> the bad-input check -> manifest.

Usage:
  summary = run(['--input', 'images/', '--output_dir', 'out/', '--model_dir', 'export/PlanetModel'])
  main()   # the command: one-line refusals (exit 1), Ctrl-C (exit 130)
"""
import itertools
import json
import os
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_jobs.common import dead_letters, runner_options
from beam_jobs.common.image_files import list_image_files
from beam_jobs.common.progress import ProgressTally, ShowProgress, show_progress_logs
from beam_jobs.predict import completed_rows, incremental
from beam_jobs.predict.config import (IMAGE_EXTENSIONS, LAYOUT, PUBLISHED_LAST, UNPUBLISHED_DIR,
                                      JobConfig, check_inputs, check_labels_csv, image_source,
                                      make_backend, parse_args)
from beam_jobs.predict.pipeline import build_pipeline
from model import command_line, manifest, schema
from model.manifest import is_local_path
from model.output_dir import check_outputs_apart, claim_output_dir, list_files

__all__ = ['main', 'run']

STAGE = schema.STAGE_PREDICT
# What the last line names, in the order a user looks for them.
_WRITTEN = (f'{schema.PREDICTIONS_PREFIX}-*.jsonl', schema.SUBMISSION_FILE,
            dead_letters.FILE_PATTERN, schema.SUMMARY_FILE,
            schema.REPORT_FILE, schema.MANIFEST_FILE)


def run(argv=None) -> dict:
  """Runs the job; returns the summary (for a Dataflow dry run, what was translated)."""
  started_at = time.time()
  args, pipeline_args = parse_args(argv)
  options = runner_options.OptionsWithViews(pipeline_args)
  dry_run = runner_options.is_dataflow_dry_run(options)
  sources = tuple(dict.fromkeys(image_source(i) for i in args.input))
  inputs = [('--input', s.root) for s in sources]
  inputs += [('--model_dir', args.model_dir), ('--labels_csv', args.labels_csv),
             ('--previous_output', args.previous_output)]
  if not dry_run:
    check_outputs_apart({'--output_dir': args.output_dir}, inputs)
  check_inputs(sources)
  if args.labels_csv:
    check_labels_csv(args.labels_csv)
  previous = (incremental.read_previous_output(args.previous_output)
              if args.previous_output else None)
  backend = make_backend(args)
  if dry_run:
    return _run_claimed(args, options, sources, previous, backend, started_at, dry_run=True)
  # Held until the run ends (or its process dies): a second run into OUT is refused meanwhile.
  with claim_output_dir(args.output_dir, LAYOUT, args.overwrite, inputs=inputs,
                        resume=args.resume,
                        job=incremental.job_identity([s.path for s in sources], args.model_dir,
                                                     args.serving_address, args.model_name)):
    return _run_claimed(args, options, sources, previous, backend, started_at, dry_run=False)


def _run_claimed(args, options, sources, previous, backend, started_at: float,
                 dry_run: bool) -> dict:
  """The run once OUT is this run's: the pipeline, the checks, then publishing."""
  # Listed once the claim is made: the rows this run keeps from here on are not among them.
  completed = completed_rows.list_completed(args.output_dir) if args.resume and not dry_run else ()
  carry = incremental.plan_carry_over(previous, completed, args.model_name, backend.version,
                                      backend.thresholds)
  if carry and carry.note:
    print(f'{STAGE}: {carry.note}', flush=True)
  config = JobConfig(sources, args.output_dir, backend.image_size, backend.thresholds,
                     args.model_name, backend.name, args.labels_csv, args.max_pixels, started_at,
                     args.max_file_bytes, carry=carry)
  patterns = [s.path for s in sources]
  print(f'{STAGE}: {", ".join(patterns)} -> {args.output_dir} ({backend.name}, '
        f'{backend.image_size}px, model {backend.model_facts})', flush=True)
  show_progress_logs()
  runner = runner_options.local_runner(options)
  tally = ProgressTally.create() if runner is not None else None   # Dataflow: its counters
  pipeline = beam.Pipeline(runner=runner, options=options)
  build_pipeline(pipeline, config, backend.handler, tally.folder if tally else None,
                 spread_reads=runner is None)
  with ShowProgress(STAGE, _count_images(sources) if tally else None, 'images', tally):
    result = pipeline.run()
    result.wait_until_finish()
  if dry_run:
    return runner_options.dry_run_description(result)

  with FileSystems.open(config.unpublished_path(schema.SUMMARY_FILE)) as f:
    summary = json.loads(f.read())
  counts = summary['counts']
  print(f'{STAGE}: {counts["images_matched"]} images matched, {counts["predictions"]} predicted, '
        f'{counts["dead_letters"]} dead letters ({summary["dead_letter_reasons"]}), '
        f'{summary["images_per_second"]} images/s'
        + (f', F2 {summary["evaluation"]["f2"]:.4f}' if 'evaluation' in summary else ''),
        flush=True)
  if 'incremental' in summary:
    print(f'{STAGE}: {incremental.describe(summary["incremental"])}', flush=True)
  if summary.get('evaluation', {}).get('unlabelled_other_form'):
    evaluation = summary['evaluation']
    print(f'{STAGE}: {evaluation["unlabelled_other_form"]:,} images not scored: no label row '
          f'names them, but {evaluation["unlabelled_other_form_examples"][0]["why"]}',
          flush=True)
  dead_letters.check_bad_fraction(counts['dead_letters'], counts['images_matched'],
                                  args.max_bad_fraction, 'images', config.dead_letters_dir,
                                  unpublished_at=config.output_path(UNPUBLISHED_DIR))
  _publish_last_files(config)
  manifest.write_manifest(args.output_dir, {
      'stage': STAGE,
      'inputs': {'patterns': patterns, 'labels_csv': args.labels_csv,
                 'labels_csv_sha256': (manifest.sha256_of_file(args.labels_csv)
                                       if args.labels_csv else None)},
      'model': {**backend.model_facts, 'name': args.model_name, 'image_size': backend.image_size,
                'ground_thresholds': {v: list(backend.thresholds(v))
                                      for v in summary['model_versions']},
                'fingerprints': {v: backend.thresholds.fingerprint(v)
                                 for v in summary['model_versions']},
                'versions_seen': summary['model_versions']},
      'options': {k: v for k, v in vars(args).items() if k not in ('input', 'output_dir')},
      'counts': {**counts, 'dead_letter_reasons': summary['dead_letter_reasons']},
      'incremental': summary.get('incremental'),
      'row_fingerprint': incremental.FINGERPRINT,
      # Relative to OUT, sub-folders included: the dead letters are in DEAD_LETTERS_DIR. The
      # completed rows are not outputs: they are deleted next, their rows being published.
      'outputs': [f for f in list_files(args.output_dir) if not completed_rows.is_part_file(f)],
  })
  completed_rows.delete_completed(args.output_dir)
  print(f'{STAGE}: wrote {args.output_dir}/({", ".join(_WRITTEN)})', flush=True)
  return summary


def _publish_last_files(config: JobConfig) -> None:
  """Moves the files a person opens from UNPUBLISHED_DIR into OUT, just before the manifest."""
  moves = [(config.unpublished_path(name), config.output_path(name)) for name in PUBLISHED_LAST]
  moves = [(staged, final) for staged, final in moves if FileSystems.exists(staged)]
  FileSystems.rename([staged for staged, _ in moves], [final for _, final in moves])
  if is_local_path(config.output_dir):   # an object store has no folder to leave behind
    try:
      os.rmdir(config.output_path(UNPUBLISHED_DIR))
    except OSError:
      pass   # a submission part folder a failed step left: the next --overwrite clears it


def _count_images(sources) -> int:
  """The images the pipeline will match (a path under two --input folders counts once).

  A second listing of the inputs, on a local run only: the progress line needs its total before
  the pipeline starts, and the pipeline keeps its own listing rather than take this list, so that
  a Dataflow job's graph never carries every path."""
  return len(set(itertools.chain.from_iterable(
      list_image_files(source, IMAGE_EXTENSIONS) for source in sources)))


def main(argv=None) -> None:
  """The command: a refused configuration or input is one line and exit 1."""
  command_line.run_command(STAGE, lambda: run(argv), refusals=(
      ValueError, FileNotFoundError, FileExistsError, dead_letters.TooManyBadInputs))
