"""python -m benchmarks [--quick | --tiny]: every stage measured side by side (see benchmarks/run.py)."""
from model import command_line

if __name__ == '__main__':
  # Before the harness is imported: TensorFlow's C++ libraries log as they load (PLANET_VERBOSE=1
  # shows them).
  command_line.quiet_third_party([])

from benchmarks.run import main  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == '__main__':
  main()
