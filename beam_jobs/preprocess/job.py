"""The preprocess job's driver: validate, claim the output folder, run, check, publish.

Usage:
  outcome = run(['--labels_csv', 'labels.csv', '--images_dir', 'jpg', '--output_dir', 'out'])
"""
import dataclasses
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState

from beam_jobs.common import dead_letters, runner_options
from beam_jobs.common.metrics import query_counters
from beam_jobs.common.progress import ProgressTally, ShowProgress, show_progress_logs
from beam_jobs.preprocess.config import ConfigError, PreprocessConfig, parse_args, validate_config
from beam_jobs.preprocess.pipeline import build_pipeline
from beam_jobs.preprocess.publish import (build_manifest, list_shards, prepare_output_dir,
                                          read_counts, summary)
from beam_jobs.preprocess.rules import CSV_ROWS, DEAD_LETTERED_ROWS, check_conservation
from model import command_line, schema
from model import manifest as manifest_lib
from model.manifest import is_local_path
from model.output_dir import OutputRefused

__all__ = ['RunOutcome', 'encoder_process_count', 'main', 'run']


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
  options = runner_options.OptionsWithViews(beam_args)
  dry_run = runner_options.is_dataflow_dry_run(options)
  config, facts = validate_config(args, check_paths=not dry_run)
  # A pipeline option like any other: the encoder DoFn starts its processes itself (setup()).
  # The shard counts never depend on it: the same input gives the same shards on any machine.
  processes = (encoder_process_count(options, beam_args, config)
               if args.encoder_processes is None else args.encoder_processes)
  config = dataclasses.replace(config, encoder_processes=processes)
  show_progress_logs()
  if dry_run:
    return _run_claimed(config, facts, options, dry_run=True)
  # Held until the run ends (or its process dies): a second run into OUT is refused meanwhile.
  with prepare_output_dir(config, args.overwrite):
    return _run_claimed(config, facts, options, dry_run=False)


def _run_claimed(config: PreprocessConfig, facts, options: PipelineOptions,
                 dry_run: bool) -> RunOutcome:
  """The run once OUT is this run's: the pipeline, its checks, then the manifest."""
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


def encoder_process_count(options: PipelineOptions, beam_args: list[str],
                          config: PreprocessConfig) -> int:
  """The default of --encoder_processes (encoder_processes.py): one per core, or
  --direct_num_workers when given, for a local run in this process whose images and outputs are
  local files; 0 (the encoder's threads) for Dataflow, the portable runner, Beam's own worker
  processes (--direct_running_mode=multi_processing), gs:// paths, or one worker."""
  if not runner_options.runs_here(options) or not all(
      is_local_path(path) for path in (config.images_dir, config.output_dir)):
    return 0
  direct = options.view_as(DirectOptions)
  if direct.direct_running_mode == 'multi_processing':
    return 0
  chosen = any(arg.split('=', 1)[0] == '--direct_num_workers' for arg in beam_args)
  count = direct.direct_num_workers if chosen else runner_options.local_cores()
  return count if count > 1 else 0


def main(argv: list[str] | None = None) -> None:
  """`run` as a command: a refusal is one line and exit 1 (model/command_line.py)."""
  command_line.run_command(schema.STAGE_PREPROCESS, lambda: run(argv),
                           refusals=(ConfigError, OutputRefused, dead_letters.TooManyBadInputs))
