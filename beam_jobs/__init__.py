"""Beam pipelines: stage 1 (`preprocess/`), stage 4 (`predict/`), what both share (`common/`),
and two tools (`make_sample`, `compare_predictions`). Imports `model`, never the reverse."""
