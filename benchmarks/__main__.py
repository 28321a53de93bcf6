"""python -m benchmarks [--quick | --tiny]: every stage measured side by side (see benchmarks/run.py)."""
from benchmarks.run import main

if __name__ == '__main__':
  main()
