#!/usr/bin/env bash
# Build the chunks that carry CUDA vLLM 0.26.0 (what it needs beyond the GPU image: vllm-wheels.txt,
# as recorded in shared/gpu) and the workbench's own needs there (extra-wheels.txt, which includes
# the embedded model's PyPI wheel) to the device machine, 62 MiB each: one device call carries at
# most 64 MiB of the working tree. The wheels are for the image's Python 3.12 and torch 2.11.
#   bash pipelines/gpu/pack.sh [OUT_DIR=.gpu]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-.gpu}
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/wheels" "$out"
grep -hv '^#' "$here/vllm-wheels.txt" "$here/extra-wheels.txt" | grep . > "$stage/req.txt"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
  --platform any -d "$stage/wheels" -r "$stage/req.txt"
rm -f "$out"/c[0-9][0-9]
(cd "$stage" && tar cf - wheels) | split -b 62m -d -a 2 - "$out/c"
ls -la "$out"; cat "$out"/c[0-9][0-9] | md5sum
