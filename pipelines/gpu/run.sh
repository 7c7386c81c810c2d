#!/usr/bin/env bash
# On the device machine, from the repo root (see pipelines/gpu/README.md):
#   bash pipelines/gpu/run.sh start [PHASE...]   start the GPU run (in .venv of ./setup.sh --cuda)
#                                                 detached, follow it for up to WAIT_S seconds; PHASE:
#                                                 prepare loadtest crosscheck shard evaluate (default all)
#   bash pipelines/gpu/run.sh wait                follow a started run for up to WAIT_S more seconds
# Results (summary.md, summary.json, gpu-results.tar.gz) are copied to $OUT at the end of each call.
# The run itself outlives one call (setsid): a device call lasts at most 10 minutes.
set -u
cmd=${1:?start|wait}; shift
WAIT_S=${WAIT_S:-540}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 \
       VLLM_NO_USAGE_STATS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export WORKBENCH_GIT_SHA=${WORKBENCH_GIT_SHA:-unknown}  # the commit that was run: pass it in
out=${OUT:-runs/gpu/out}
PY=${PYTHON:-python3}; [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
if [ "$cmd" = start ]; then
  # The environment comes from ./setup.sh --cuda (offline: --wheelhouse DIR; pipelines/gpu/README.md).
  "$PY" -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__, torch.cuda.get_device_name(0))" \
    || { echo "no CUDA vLLM for $PY: run ./setup.sh --cuda first (pipelines/gpu/README.md)" >&2; exit 1; }
  only=(); [ $# -gt 0 ] && only=(--only "$@")
  setsid nohup "$PY" pipelines/gpu/gpu_run.py --out runs/gpu/out "${only[@]}" >/tmp/gpu_run.log 2>&1 &
  echo $! >/tmp/gpu_run.pid
fi
pid=$(cat /tmp/gpu_run.pid)
end=$((SECONDS + WAIT_S))
while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
kill -0 "$pid" 2>/dev/null && echo "RUNNING (pid $pid): call 'run.sh wait' next" || echo "FINISHED"
mkdir -p "$out"; cp runs/gpu/out/* "$out"/ 2>/dev/null; cp /tmp/gpu_run.log "$out"/gpu_run.log
grep -E "=== phase|step rate|SLO met|drift|failed|Error|error:" /tmp/gpu_run.log | tail -60
