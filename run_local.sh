#!/usr/bin/env bash
# The whole flow on DirectRunner on sample data (no argument), or the test suite (`test`).
# Creates .venv and installs the package into it when missing or out of date.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}   # TensorFlow's start-up chatter hides our output

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 12), sys.version' \
      || { echo "run_local.sh: needs Python 3.10-3.12 (set PYTHON=...)" >&2; exit 1; }
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  # Reinstall when setup.py changed since the last install.
  if [ ! -f "$VENV/.installed" ] || [ setup.py -nt "$VENV/.installed" ]; then
    echo "== installing the package and its dependencies into $VENV (a few minutes the first time)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[test]'
    touch "$VENV/.installed"
  fi
}

# The report test opens report.html in a real headless browser: Debian's chromium.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian's chromium for the report test"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null \
      || echo "run_local.sh: could not install chromium; the report test will fail" >&2
  else
    echo "run_local.sh: no apt-get: install Chromium yourself for the report test" >&2
  fi
}

run_flow() {
  local work=${PLANET_WORK_DIR:-work}
  local sample_count=${PLANET_SAMPLE_COUNT:-2000}
  local images_dir=${PLANET_IMAGES_DIR:-}
  local labels_csv=${PLANET_LABELS_CSV:-}
  if [ -z "$images_dir" ]; then
    images_dir=$work/sample/train-jpg
    labels_csv=$work/sample/train_v2.csv
    if [ -f "$labels_csv" ]; then
      echo "== sample data: reusing $work/sample"
    else
      echo "== sample data: making $sample_count chips in $work/sample"
      "$VENV/bin/python" -m beam_jobs.make_sample --output_dir "$work/sample" \
        --count "$sample_count" --seed 0
    fi
  fi
  echo "== done: sample data in $images_dir, labels in $labels_csv"
}

ensure_venv
case "${1:-}" in
  test)
    shift
    ensure_chromium
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  "")
    run_flow
    ;;
  *)
    echo "usage: ./run_local.sh [test [pytest args...]]" >&2
    exit 2
    ;;
esac
