"""`python -m beam_jobs.preprocess`: the preprocess job as a command (see the package docstring)."""
from beam_jobs.preprocess.job import main
from model import command_line

__all__ = []

if __name__ == '__main__':
  # Importing the job loads Beam only; TensorFlow loads later, once this has run.
  command_line.quiet_third_party()
  main()
  command_line.skip_teardown_collections()
