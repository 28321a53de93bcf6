"""`python -m beam_jobs.predict`: the prediction job as a command (flags: `--help`)."""
import gc
import logging

from beam_jobs.predict.job import main
from model import command_line

__all__ = []

if __name__ == '__main__':
  # Importing the job loads Beam only; TensorFlow loads later, once this has run.
  command_line.quiet_third_party()
  logging.getLogger().setLevel(logging.WARNING)
  main()
  # Everything is written and said. What is left is the interpreter's teardown, whose garbage
  # collections went through every object of Beam and TensorFlow (~450,000): 1.3 s after the
  # last line on 2 cores. Frozen, they are skipped; the exit handlers still run.
  gc.freeze()
