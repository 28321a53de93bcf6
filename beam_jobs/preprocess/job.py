"""The preprocess job's driver: validate, claim the output folder, run, check, publish."""
import dataclasses
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState

from beam_jobs.common import dead_letters, runner_options
from beam_jobs.common.progress import (ProgressTally, ShowProgress, query_counters,
                                       show_progress_logs)
from beam_jobs.preprocess.config import ConfigError, parse_args, validate_config
from beam_jobs.preprocess.pipeline import build_pipeline
from beam_jobs.preprocess.publish import (build_manifest, list_shards, prepare_output_dir,
                                          read_counts, summary)
from beam_jobs.preprocess.rules import CSV_ROWS, DEAD_LETTERED_ROWS, check_conservation
from model import command_line, schema
from model import manifest as manifest_lib
from model.output_dir import OutputRefused

__all__ = ['LOCAL_WORKERS_FROM_ROWS', 'RunOutcome', 'main', 'run']

# A local run of this many CSV rows or more runs on one worker process per core unless the user
# chose (--direct_running_mode / --direct_num_workers). In one process the encoder's threads
# reach about 0.9 of a core of two (Pillow and protobuf hold the GIL for part of each image);
# worker processes reach both cores but take 5-8 s to start. Measured on 2 cores (issue 14):
# 10,000 chips 9.9 s in-process against 14.9 s with 2 workers, 50,000 chips 42.3 s against
# 28.8 s: the two cross near 20,000 rows.
LOCAL_WORKERS_FROM_ROWS = 20_000


@dataclasses.dataclass
class RunOutcome:
  """What `run` returns: the Beam result (its job, in a dry run) and the manifest (None then)."""
  pipeline_result: object
  manifest: dict | None
  counters: dict[str, int] = dataclasses.field(default_factory=dict)


def run(argv: list[str] | None = None) -> RunOutcome:
  """Parses flags, validates, runs the job, checks it and publishes the manifest.

  Raises:
    ConfigError: bad flags or inputs (before anything runs).
    OutputRefused: --output_dir is not this job's to write (before anything runs).
    dead_letters.TooManyBadInputs: more dead-lettered rows than --max_bad_fraction allows (the
      shards exist, the manifest does not).
  """
  args, beam_args = parse_args(argv)
  options = PipelineOptions(beam_args)
  dry_run = runner_options.is_dataflow_dry_run(options)
  config, facts = validate_config(args, check_paths=not dry_run)
  if facts.rows and facts.rows >= LOCAL_WORKERS_FROM_ROWS:
    spread = runner_options.local_worker_processes(beam_args)
    if spread != beam_args:
      options = PipelineOptions(spread)
      print(f'{schema.STAGE_PREPROCESS}: {facts.rows:,} CSV rows: {spread[-1].split("=")[1]} '
            'local worker processes (--direct_num_workers=1 keeps one)', flush=True)
  show_progress_logs()
  if not dry_run:
    prepare_output_dir(config, args.overwrite)

  started = time.monotonic()
  runner = runner_options.local_runner(options)
  tally = ProgressTally.create() if runner is not None else None   # Dataflow: its counters
  pipeline = beam.Pipeline(runner=runner, options=options)
  build_pipeline(pipeline, config, tally.folder if tally else None)
  with ShowProgress(schema.STAGE_PREPROCESS, facts.rows, 'CSV rows', tally):
    result = pipeline.run()
    result.wait_until_finish()
  if not dry_run and result.state != PipelineState.DONE:
    raise RuntimeError(f'the pipeline ended in state {result.state}; nothing was published')
  if dry_run:
    print('preprocess: dry run, the job was translated and not submitted; nothing was written')
    return RunOutcome(result, None)

  seconds = time.monotonic() - started
  runner = str(options.view_as(StandardOptions).runner or 'DirectRunner')
  manifest = build_manifest(config, facts, read_counts(config), list_shards(config), runner,
                            seconds)
  counts = manifest['counts']
  check_conservation(counts)
  dead_letters.check_bad_fraction(
      counts[DEAD_LETTERED_ROWS], counts[CSV_ROWS], config.max_bad_fraction, 'CSV rows',
      FileSystems.join(config.output_dir, schema.DEAD_LETTERS_DIR))
  manifest_lib.write_manifest(config.output_dir, manifest)
  print(summary(manifest, config.output_dir))
  return RunOutcome(result, manifest, query_counters(result))


def main(argv: list[str] | None = None) -> None:
  """`run` as a command: a refusal is one line and exit 1 (model/command_line.py)."""
  command_line.run_command(schema.STAGE_PREPROCESS, lambda: run(argv),
                           refusals=(ConfigError, OutputRefused, dead_letters.TooManyBadInputs))
