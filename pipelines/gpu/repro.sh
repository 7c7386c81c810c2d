#!/usr/bin/env bash
# The pipeline on a GPU host (the one GPU orchestration path: a profile merged into params.yaml,
# then `dvc repro`), detached from the shell that starts it (a remote session may drop; `dvc repro`
# takes longer than one SSH command should). From the repo root:
#
#   bash pipelines/gpu/repro.sh start [SETUP OPTIONS...]   ./setup.sh --cuda SETUP OPTIONS (e.g.
#       --wheelhouse DIR --system-site-packages --no-quant), the profiles merged into params.yaml
#       (pipelines/gpu/overlay.py: a misspelled key stops the run, named), `dvc repro [TARGETS]`,
#       all under setsid; follows the log for up to WAIT_S seconds
#   bash pipelines/gpu/repro.sh wait                         follow it for WAIT_S more seconds
#
# What a run does is written in its profile (the variants, the servers, the load, the SLO); the
# environment says only what the host and the lease need. Every knob, and its default:
#   PROFILE="a.yaml b.yaml"  the profiles, merged in this order (default pipelines/gpu/params-gpu.yaml;
#                            none: params.yaml as it is)
#   TARGETS=speed            `dvc repro TARGETS` (default: every stage), e.g. report (no shard stage),
#                            loadtest, speed
#
# Several GPUs (issue 33; pipelines/gpu/README.md): 2 GPUs
#   PROFILE=pipelines/gpu/params-gpu-multi.yaml TARGETS=speed bash pipelines/gpu/repro.sh start --no-quant ...
# 4 GPUs (adds PP=2 against TP=2)
#   PROFILE="pipelines/gpu/params-gpu-multi.yaml pipelines/gpu/params-gpu-multi4.yaml" TARGETS=speed \
#     bash pipelines/gpu/repro.sh start --no-quant ...
# NVLink multicast stays off below (NCCL_NVLS_ENABLE=0 ...); every vLLM server inherits it.
#   WAIT_S=540               seconds this call follows the run before it returns (the run goes on)
#   RESULTS=DIR              where each call copies what came out (default runs/gpu-repro)
#   CARRIED="prepare quantize"  those stages' outputs and dvc.lock were made on another machine and
#                            carried here: `dvc commit` puts them in this cache, and the run stops if
#                            that would change the lock (outputs not made by this code and params)
#   CARRIED_READY=FILE       the carried outputs are still arriving while setup runs (a leased
#                            machine's transfers overlap its install): after setup, wait for FILE
#                            before using them; whoever unpacks them creates FILE last
#   CARRIED_WAIT_S=900       ... for at most this many seconds, then stop with the reason
#   REDIS=DIR                pipelines/gpu/redis-bundle.sh's redis folder, unpacked here: a Redis on
#                            127.0.0.1:6379 for the run, and params-gateway-redis.yaml merged (the
#                            gateway arms as workers sharing their limits); one worker, said in the
#                            log, if it does not answer
#
# Each call ends by copying the results to $RESULTS, as few files as can come back from a leased
# machine (there: at most 8 files of 16 MiB): repro.log, results.tar.gz (every stage report,
# metrics.json, dvc.lock, params.yaml, the MLflow run list, the setup log, the notebooks, the
# evaluation records, the load test's logs; `python -m pipelines.gpu.import_results` takes it) and
# the load test's raw records in parts of 15 MiB (loadtest-records.tar.gz.part0, part1, ...: cat
# them, then tar xzf). A folder that is not a git repository gets one (DVC needs it), with one commit.
set -u
cmd=${1:?start|wait}; shift
[ -z "${VARIANTS:-}" ] || { echo "repro.sh: VARIANTS is no longer read: the profile names the variants" \
  "(quantize.variants.<name>: null removes one; pipelines/gpu/params-gpu2.yaml)" >&2; exit 2; }
WAIT_S=${WAIT_S:-540}
RESULTS=${RESULTS:-runs/gpu-repro}
PROFILE=${PROFILE:-pipelines/gpu/params-gpu.yaml}
state=runs/gpu-repro-state; mkdir -p "$state" "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# NVLink multicast off (harmless on one GPU; on shared multi-GPU hosts it can take GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

if [ "$cmd" = start ]; then
  cat > "$state/run.sh" <<'INNER'
set -x
t0=$SECONDS
./setup.sh --cuda "$@" > runs/gpu-repro-state/setup.log 2>&1 || { echo "SETUP FAILED rc=$?"; tail -n 40 runs/gpu-repro-state/setup.log; exit 1; }
tail -n 3 runs/gpu-repro-state/setup.log
echo "setup_s=$((SECONDS - t0))"
if [ -n "$CARRIED_READY" ]; then
  waited=0
  while [ ! -e "$CARRIED_READY" ]; do
    [ "$waited" -lt "${CARRIED_WAIT_S:-900}" ] || { echo "CARRIED: $CARRIED_READY did not appear within ${waited}s of setup's end; the carried outputs are not all here"; exit 1; }
    sleep 2; waited=$((waited + 2))
  done
  echo "carried outputs in place (${waited}s waited after setup)"
fi
. .venv/bin/activate
if ! git rev-parse --git-dir >/dev/null 2>&1; then
  git init -q && git add -A && git -c user.name=workbench -c user.email=workbench@localhost commit -qm "GPU run" || exit 1
fi
if [ "$PROFILE" != none ]; then
  for profile in $PROFILE; do python -m pipelines.gpu.overlay "$profile" || exit 1; done
fi
if [ -n "$REDIS" ]; then
  "$REDIS/run.sh" --port 6379 --bind 127.0.0.1 --save '' --appendonly no --daemonize yes --dir /tmp \
    --logfile "$PWD/runs/gpu-repro-state/redis.log"
  sleep 1
  if python -c "import redis; redis.Redis(host='127.0.0.1', port=6379, socket_timeout=2).ping()"; then
    python -m pipelines.gpu.overlay pipelines/gpu/params-gateway-redis.yaml || exit 1
    echo "redis: up; the gateway arms run as workers sharing their limits in it"
  else
    echo "REDIS: not answering (runs/gpu-repro-state/redis.log): the gateway arms keep one worker"
  fi
fi
python -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -n "$CARRIED" ]; then
  cp dvc.lock runs/gpu-repro-state/dvc.lock.carried
  dvc commit -f $CARRIED || exit 1
  cmp -s dvc.lock runs/gpu-repro-state/dvc.lock.carried || {
    echo "CARRIED: the carried outputs do not match this code and params:"; diff runs/gpu-repro-state/dvc.lock.carried dvc.lock | head -n 40; exit 1; }
  echo "carried: $CARRIED up to date"
fi
t1=$SECONDS
dvc repro $TARGETS; rc=$?
echo "dvc_repro_rc=$rc dvc_repro_s=$((SECONDS - t1))"
dvc status
exit $rc
INNER
  PROFILE=$PROFILE TARGETS=${TARGETS:-} CARRIED=${CARRIED:-} REDIS=${REDIS:-} \
    CARRIED_READY=${CARRIED_READY:-} CARRIED_WAIT_S=${CARRIED_WAIT_S:-900} \
    setsid nohup bash "$state/run.sh" "$@" > "$state/repro.log" 2>&1 < /dev/null &
  echo $! > "$state/pid"
fi
pid=$(cat "$state/pid")
end=$((SECONDS + WAIT_S))
while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
if kill -0 "$pid" 2>/dev/null; then echo "RUNNING (pid $pid): call 'repro.sh wait' next"; else echo "FINISHED"; fi
# What came out so far.
cp "$state/repro.log" "$RESULTS"/ 2>/dev/null
if [ -x .venv/bin/python ]; then
  .venv/bin/python - > "$state/mlflow-runs.json" 2>/dev/null <<'PY'
import json
import mlflow
from workbench import tracking
mlflow.set_tracking_uri(tracking.tracking_uri())
runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
print(json.dumps([{"name": r.info.run_name, "status": r.info.status, "metrics": len(r.data.metrics),
                   "params": len(r.data.params)} for r in runs], indent=1))
PY
fi
tar czf "$RESULTS/results.tar.gz" --ignore-failed-read reports dvc.lock params.yaml metrics.json \
  "$state/mlflow-runs.json" "$state/setup.log" "$state/redis.log" runs/failed runs/notebooks runs/evaluate \
  runs/loadtest/*/*.md runs/loadtest/*/*.png runs/loadtest/*/*.log \
  runs/speed/tables.md runs/speed/*/*/*.md runs/speed/*/*/*.png runs/speed/*/*/*.log runs/speed/shard/*.log 2>/dev/null
# The load test's raw records (every request's timings; ~1 KB a request compressed), apart and in
# parts that can come back: for a re-analysis of a run that did not finish, not for git.
rm -f "$RESULTS"/loadtest-records.tar.gz*
if ls runs/loadtest/*/step-*.jsonl runs/speed/*/*/step-*.jsonl 2>/dev/null | grep -q .; then  # either may be absent
  tar czf - --ignore-failed-read runs/loadtest/*/step-*.jsonl runs/speed/*/*/step-*.jsonl 2>/dev/null \
    | split -b 15m -d -a 1 - "$RESULTS/loadtest-records.tar.gz.part"
  n=$(ls "$RESULTS"/loadtest-records.tar.gz.part* | wc -l)
  [ "$n" -le 4 ] || echo "WARNING: $n parts of load-test records; a leased machine returns 64 MiB in all"
fi
grep -E "^(Running stage|Stage '|ERROR|setup_s|dvc_repro|torch |SETUP|carried|CARRIED|redis|REDIS)|Traceback|Error:" "$state/repro.log" | tail -n 60
