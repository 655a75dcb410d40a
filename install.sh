#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv.
#   bash install.sh          the pipeline (library, CLI, Prefect, alpaca-eval)
#   bash install.sh --dev    plus the test and lint tools
# torch is pinned first: an unpinned torch pulls several GB of CUDA wheels on a
# CPU machine. On a GPU machine set SPA_TORCH (e.g. SPA_TORCH="torch==2.13.0"
# with your CUDA index in PIP_EXTRA_INDEX_URL).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
TORCH=${SPA_TORCH:-torch==2.13.0}
extras="orchestration,eval"
for arg in "$@"; do
  case "$arg" in
    --dev) extras="$extras,dev" ;;
    *) echo "install.sh: unknown option $arg (use --dev)" >&2; exit 2 ;;
  esac
done
command -v "$PY" >/dev/null || { echo "install.sh: $PY not found; set PYTHON=/path/to/python3.11" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH"
# torch named again so that nothing below can swap it for another build
"$VENV/bin/python" -m pip install -q -e ".[$extras]" "$TORCH"
echo "installed spa-pipeline into $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
