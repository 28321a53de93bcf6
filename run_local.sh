#!/usr/bin/env bash
# The whole flow on DirectRunner on sample data (no argument), or the test suite (`test`).
# Creates .venv and installs the package into it when missing or out of date.
# Every command hides TensorFlow's, absl's, CUDA's and Beam's chatter itself; PLANET_VERBOSE=1
# (read by each command) shows it again.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
export PLANET_VERBOSE=${PLANET_VERBOSE:-0}

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

stage() { echo; echo "== $*"; }

# Stops the script with the failing stage's own message, not a cascade of follow-on errors.
run_stage() {
  local name=$1; shift
  if ! "$@"; then
    echo "run_local.sh: stage '$name' failed (its message is above); stopping." >&2
    exit 1
  fi
}

free_port() {
  "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

run_flow() {
  local py="$VENV/bin/python"
  local work=${PLANET_WORK_DIR:-work}
  local sample_count=${PLANET_SAMPLE_COUNT:-3000}
  local holdout_count=${PLANET_HOLDOUT_COUNT:-500}
  local epochs=${PLANET_EPOCHS:-6}
  local image_size=${PLANET_IMAGE_SIZE:-128}
  local force=${PLANET_FORCE:-0}
  local images_dir=${PLANET_IMAGES_DIR:-}
  local labels_csv=${PLANET_LABELS_CSV:-}
  local predict_dir=${PLANET_PREDICT_DIR:-}
  local predict_labels=${PLANET_PREDICT_LABELS_CSV:-}
  local workers
  workers=$(nproc 2>/dev/null || echo 2)
  local started=$SECONDS
  mkdir -p "$work"

  if [ -z "$images_dir" ]; then
    stage "sample data: $sample_count training chips + $holdout_count held-out chips in $work/"
    if [ -f "$work/sample/train_v2.csv" ] && [ "$force" != 1 ]; then
      echo "reusing $work/sample and $work/holdout (PLANET_FORCE=1 to remake)"
    else
      run_stage sample "$py" -m beam_jobs.make_sample --output_dir "$work/sample" --count "$sample_count" --seed 0
      run_stage sample "$py" -m beam_jobs.make_sample --output_dir "$work/holdout" --count "$holdout_count" --seed 1 --prefix holdout
    fi
    images_dir=$work/sample/train-jpg
    labels_csv=$work/sample/train_v2.csv
    predict_dir=$work/holdout/train-jpg
    predict_labels=$work/holdout/train_v2.csv
  else
    : "${labels_csv:?PLANET_LABELS_CSV must name the labels CSV of PLANET_IMAGES_DIR}"
    predict_dir=${predict_dir:-$images_dir}
    predict_labels=${predict_labels:-$labels_csv}
  fi

  stage "1/4 preprocess: $labels_csv + $images_dir -> $work/prep (DirectRunner, $workers processes)"
  if [ -f "$work/prep/manifest.json" ] && [ "$force" != 1 ]; then
    echo "reusing $work/prep (it has a manifest; PLANET_FORCE=1 to redo)"
  else
    run_stage preprocess "$py" -m beam_jobs.preprocess --labels_csv "$labels_csv" --images_dir "$images_dir" \
      --output_dir "$work/prep" --image_size "$image_size" --overwrite \
      --direct_running_mode=multi_processing --direct_num_workers="$workers"
  fi

  stage "2/4 train + export: $work/prep -> $work/job, $work/export/PlanetModel/<N>"
  if ls -d "$work"/export/PlanetModel/[0-9]* >/dev/null 2>&1 && [ "$force" != 1 ]; then
    echo "reusing the export in $work/export/PlanetModel (PLANET_FORCE=1 to retrain)"
  else
    rm -rf "$work/job"   # a new training run; model.train refuses to mix with old checkpoints
    run_stage train "$py" -m model.train --data_dir "$work/prep" --job_dir "$work/job" \
      --export_base "$work/export" --epochs "$epochs"
  fi

  stage "3/4 predict in-process: $predict_dir -> $work/predict_local"
  run_stage predict "$py" -m beam_jobs.predict --input "$predict_dir" --output_dir "$work/predict_local" \
    --model_dir "$work/export/PlanetModel" --labels_csv "$predict_labels" --overwrite

  local port
  port=$(free_port)
  stage "4/4 predict through gRPC: local TF Serving-compatible server on 127.0.0.1:$port -> $work/predict_grpc"
  "$py" -m model.serve --model_base_path "$work/export/PlanetModel" --port "$port" > "$work/serve.log" 2>&1 &
  local server_pid=$!
  trap 'kill $server_pid 2>/dev/null || true' EXIT
  # The prediction job itself waits for the server to answer GetModelMetadata.
  run_stage predict-grpc "$py" -m beam_jobs.predict --input "$predict_dir" --output_dir "$work/predict_grpc" \
    --serving_address "127.0.0.1:$port" --model_dir "$work/export/PlanetModel" \
    --labels_csv "$predict_labels" --overwrite
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  trap - EXIT
  echo "server stopped (its log: $work/serve.log)"
  run_stage compare "$py" -m beam_jobs.compare_predictions "$work/predict_local" "$work/predict_grpc"

  local f2
  f2=$("$py" -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["evaluation"]["f2"], 4))' "$work/predict_local/summary.json")
  stage "done in $((SECONDS - started)) s"
  # The file names of model/schema.py (REPORT_FILE, SUBMISSION_FILE, DEAD_LETTERS_DIR).
  echo "F2 on $predict_dir (Kaggle's metric, averaged over images): $f2"
  echo "report:       $work/predict_local/report.html"
  echo "submission:   $work/predict_local/submission.csv"
  echo "dead letters: $work/prep/dead_letters/ and $work/predict_local/dead_letters/"
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
