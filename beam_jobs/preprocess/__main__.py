"""`python -m beam_jobs.preprocess`: the preprocess job as a command (see the package docstring)."""
from beam_jobs.preprocess.job import main

__all__ = []

if __name__ == '__main__':
  main()
