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
