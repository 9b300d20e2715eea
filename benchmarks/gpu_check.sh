#!/usr/bin/env bash
# One-shot GPU check (see benchmarks/README.md, "gpu_check.sh"). Prints a table; exits 0.
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--out FILE] [--dry-run] [--budget SECONDS] [--sections a,b]
#
#   --wheels DIR   first install DIR/*.whl (no index, no dependency resolution) into a private
#                  folder ($DLMEM_SITE, default /tmp/site) that goes first on PYTHONPATH:
#                  for an offline machine that has torch/transformers but not lm-eval, bitsandbytes, ...
#   --dry-run      the same code on CPU with tiny sizes (< 60 s); without it and without a GPU the
#                  script says so in one line and exits 0.
# Every other argument goes to benchmarks/gpu_check.py.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
SITE="${DLMEM_SITE:-/tmp/site}"
WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels)
      [ $# -ge 2 ] || { echo "gpu_check.sh: --wheels needs a directory of .whl files" >&2; exit 2; }
      WHEELS="$2"; shift 2 ;;
    --wheels=*) WHEELS="${1#--wheels=}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

if [ -n "$WHEELS" ]; then
  shopt -s nullglob
  whl=("$WHEELS"/*.whl)
  shopt -u nullglob
  [ ${#whl[@]} -gt 0 ] || { echo "gpu_check.sh: --wheels $WHEELS holds no .whl files" >&2; exit 2; }
  echo "gpu_check.sh: installing ${#whl[@]} wheels from $WHEELS into $SITE" >&2
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whl[@]}"
  export PYTHONPATH="$SITE:$REPO"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$REPO"
exec "$PYTHON" benchmarks/gpu_check.py ${ARGS[@]+"${ARGS[@]}"}
