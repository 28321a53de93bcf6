"""`python -m beam_jobs.predict`: the prediction job as a command (flags: `--help`)."""
import logging

from beam_jobs.predict.job import main

__all__ = []

if __name__ == '__main__':
  logging.getLogger().setLevel(logging.WARNING)
  main()
