#!/usr/bin/env bash
# Build a wheel bundle (a "wheelhouse") of the CUDA locks on a machine with network, for a GPU host
# without one: every pin of requirements/cuda.lock and requirements/quant-cuda.lock as a wheel for
# Linux x86-64 and one CPython version (sdist-only pins are built into wheels here), so that
#   ./setup.sh --cuda --wheelhouse DIR/wheels
# installs both environments there offline.
#
#   bash pipelines/gpu/pack.sh [OPTIONS] [OUT_DIR=.gpu]
#     --python X.Y      the GPU host's Python (default 3.12)
#     --have FILE       a `pip freeze` of the GPU host's Python: pins it already has at the same version
#                       are left out (use with ./setup.sh --system-site-packages there)
#     --split MIB       also cut the bundle into tar chunks of MIB MiB (OUT_DIR/c00, c01, ...), for a
#                       transfer with a size limit; there: cat c[0-9][0-9] | tar xf -. Where each chunk
#                       travels with a copy of the repository, MIB plus the repository's size (printed
#                       at the end) must stay under that limit
#     --locks "A B"     the lock files (default: requirements/cuda.lock requirements/quant-cuda.lock)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
py=3.12; have=""; split=""; locks="$root/requirements/cuda.lock $root/requirements/quant-cuda.lock"; out=.gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --python) py=$2; shift ;;
    --have) have=$2; shift ;;
    --split) split=$2; shift ;;
    --locks) locks=$2; shift ;;
    -*) echo "pack.sh: unknown option $1" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done
mkdir -p "$out/wheels"
# The pins to fetch, one requirements file per lock (two locks may pin one package differently, and
# pip takes one version of a name per call), less those the host has (same name and version).
rm -f "$out"/requirements-*.txt
python3 - "$have" "$out" $locks <<'PY'
import re, sys
from pathlib import Path
def norm(name): return re.sub(r"[-_.]+", "-", name).lower()
def pins(path):
    for line in open(path):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            yield norm(name.split("[")[0]), ver.split(";")[0].strip()
have = set(pins(sys.argv[1])) if sys.argv[1] else set()
out, locks = Path(sys.argv[2]), sys.argv[3:]
fetched = set()
for i, lock in enumerate(locks):
    want = sorted(set(pins(lock)))
    lines = [f"{n}=={v}" for n, v in want if (n, v) not in have and (n, v) not in fetched]
    fetched.update(p for p in want if p not in have)
    if i == 0:  # setup.sh --wheelhouse installs these first (the editable install's build backend)
        lines += [x for x in ("setuptools", "wheel") if not any(n == x for n, _ in want + sorted(have))]
    (out / f"requirements-{i}.txt").write_text("".join(f"{line}\n" for line in lines))
    print(f"pack: {lock}: {len(want)} pins, {len(lines)} to fetch", file=sys.stderr)
PY
plats=(--platform any --platform linux_x86_64 --platform manylinux1_x86_64 --platform manylinux2010_x86_64
       --platform manylinux2014_x86_64)
for n in $(seq 5 39); do plats+=(--platform "manylinux_2_${n}_x86_64"); done
abi=cp${py/./}
# --no-deps: the locks are complete. --prefer-binary (not --only-binary) lets an sdist-only pin come
# as its source archive, built into a wheel below.
for req in "$out"/requirements-*.txt; do
  python3 -m pip download -q --no-deps --prefer-binary --python-version "$py" --implementation cp \
    --abi "$abi" --abi abi3 --abi none "${plats[@]}" -d "$out/wheels" -r "$req"
done
shopt -s nullglob
sdists=("$out"/wheels/*.tar.gz "$out"/wheels/*.zip)
if [ ${#sdists[@]} -gt 0 ]; then
  echo "pack: building wheels of ${#sdists[@]} source-only pins: ${sdists[*]##*/}" >&2
  python3 -m pip wheel -q --no-deps -w "$out/wheels" "${sdists[@]}"
  rm -f "${sdists[@]}"
fi
du -sh "$out/wheels" >&2
if [ -n "$split" ]; then
  rm -f "$out"/c[0-9][0-9]
  (cd "$out" && tar cf - wheels) | split -b "${split}m" -d -a 2 - "$out/c"
  ls -la "$out"/c[0-9][0-9] >&2
  cat "$out"/c[0-9][0-9] | md5sum >&2
  echo "pack: the repository's tracked files: $(cd "$root" && git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -n 1 | cut -f1) KiB (on disk); a chunk travels beside them" >&2
fi
