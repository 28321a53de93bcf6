"""Facts about how a job was asked to run, shared by both Beam jobs."""
import argparse
import difflib
import os

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

from model import command_line

__all__ = ['OptionsWithViews', 'beam_flags', 'check_beam_flags', 'dry_run_description',
           'is_dataflow_dry_run', 'local_cores', 'local_runner', 'parse_job_args', 'runs_here']


class OptionsWithViews(PipelineOptions):
  """Beam's pipeline options, whose view of each options class (`view_as`) is made once.

  Beam asks for a view for every transform it applies (TypeOptions, two or three times), and each
  new view parses the flags again: ~600 parses for the prediction job's graph, 0.19 s of its
  start-up on 2 cores. A view holds no values of its own (all views share the options' values),
  so one view per class is the same as a new one each time.
  """

  def view_as(self, cls):
    views = vars(self).setdefault('_views', {})   # vars(): PipelineOptions guards setattr
    if cls not in views:
      views[cls] = super().view_as(cls)
    return views[cls]

  def __getstate__(self):
    # Pickled and deep-copied (beam.Pipeline copies its options) without the views.
    state = dict(super().__getstate__())
    state.pop('_views', None)
    return state


def is_dataflow_dry_run(options: PipelineOptions) -> bool:
  """A Dataflow dry run translates the job and submits nothing: skip every output check and write.

  --dry_run only means something to DataflowRunner: elsewhere the job really runs and publishes.
  """
  runner = str(options.view_as(StandardOptions).runner or '').lower()
  return 'dataflow' in runner and bool(options.view_as(TestOptions).dry_run)


def dry_run_description(result) -> dict:
  """What a Dataflow dry run translated: the job's name and the labels of its transforms."""
  transforms = result.job.proto_pipeline.components.transforms.values()
  return {'dry_run': True, 'job_name': result.job.options.get_all_options()['job_name'],
          'transforms': sorted(t.unique_name for t in transforms)}


def runs_here(options: PipelineOptions) -> bool:
  """Whether the job runs on this machine: the default DirectRunner, in batch."""
  standard = options.view_as(StandardOptions)
  return standard.runner in (None, 'DirectRunner') and not standard.streaming


def local_cores() -> int:
  """The cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def local_runner(options: PipelineOptions):
  """Beam's FnApiRunner when the job runs on the default DirectRunner; None (as asked) otherwise.

  Beam's DirectRunner first tries the Prism runner for a pipeline Prism supports, and when no
  Prism binary is cached it downloads one from github.com at run time: an unasked-for network
  call (a hang behind a firewall that drops packets), an unpinned binary executed, and SDK workers
  in other processes. The FnApiRunner chosen here is what DirectRunner falls back to offline, set
  up the way DirectRunner sets it up, so `--direct_running_mode` and `--direct_num_workers` still
  apply and a local run stays on this machine.
  """
  if not runs_here(options):
    return None
  # pylint: disable=import-outside-toplevel
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  from apache_beam.runners.portability.portable_runner import JobServiceHandle
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def _option_classes(cls=PipelineOptions):
  for subclass in cls.__subclasses__():
    yield subclass
    yield from _option_classes(subclass)


def beam_flags() -> set[str]:
  """Every flag that Beam's pipeline options define (all runners' options, Dataflow's too)."""
  # Each options class adds its flags to a parser (Beam's own protocol for PipelineOptions
  # subclasses); 'resolve', since several classes declare the same flag.
  parser = argparse.ArgumentParser(add_help=False, conflict_handler='resolve')
  for cls in set(_option_classes()):
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  return {flag for action in parser._actions for flag in action.option_strings}


def check_beam_flags(beam_args: list[str], own_flags: list[str]) -> None:
  """Refuses a flag that neither the job nor Beam defines, naming the closest known flag.

  Beam itself only logs such a flag among its other output and drops it, so a typo like
  --max_bad_fractoin would run the job with the default.

  Raises:
    ValueError: one line, e.g. 'unknown flag --max_bad_fractoin (did you mean --max_bad_fraction?)'.
  """
  known = None
  for arg in beam_args:
    if not arg.startswith('--'):
      continue   # the value of the flag before it
    flag = arg.split('=', 1)[0]
    known = known or beam_flags()
    if flag not in known:
      close = difflib.get_close_matches(flag, own_flags + sorted(known), n=1, cutoff=0.6)
      hint = f' (did you mean {close[0]}?)' if close else ''
      raise ValueError(f'unknown flag {flag[:100]}{hint}; --help lists the job\'s own flags, '
                       'and Beam\'s pipeline options are also accepted')


def parse_job_args(parser, argv: list[str] | None):
  """A Beam job's own flags, and the rest as Beam pipeline options, after refusing (one line,
  through `parser.error`) any flag that neither the job nor Beam defines."""
  args, beam_args = parser.parse_known_args(argv)
  try:
    check_beam_flags(beam_args, command_line.own_flags(parser))
  except ValueError as e:
    parser.error(str(e))
  return args, beam_args
