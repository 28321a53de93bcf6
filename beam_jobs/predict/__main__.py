"""`python -m beam_jobs.predict`: the prediction job as a command (flags: `--help`)."""
import logging

from beam_jobs.predict.job import main
from model import command_line

__all__ = []

if __name__ == '__main__':
  # Importing the job loads Beam only; TensorFlow loads later, once this has run.
  command_line.quiet_third_party()
  logging.getLogger().setLevel(logging.WARNING)
  main()
  command_line.skip_teardown_collections()
