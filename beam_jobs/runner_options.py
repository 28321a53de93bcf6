"""Facts about how a job was asked to run, shared by both Beam jobs."""
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions


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


def local_runner(options: PipelineOptions):
  """Beam's FnApiRunner when the job runs on the default DirectRunner; None (as asked) otherwise.

  Beam's DirectRunner first tries the Prism runner for a pipeline Prism supports, and when no
  Prism binary is cached it downloads one from github.com at run time: an unasked-for network
  call (a hang behind a firewall that drops packets), an unpinned binary executed, and SDK workers
  in other processes. The FnApiRunner chosen here is what DirectRunner falls back to offline, set
  up the way DirectRunner sets it up, so `--direct_running_mode` and `--direct_num_workers` still
  apply and a local run stays on this machine.
  """
  standard = options.view_as(StandardOptions)
  if standard.runner not in (None, 'DirectRunner') or standard.streaming:
    return None
  # pylint: disable=import-outside-toplevel
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  from apache_beam.runners.portability.portable_runner import JobServiceHandle
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))
