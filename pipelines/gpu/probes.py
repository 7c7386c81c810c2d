"""The rates a knee search probed, as a table (table 6.2's rows), from the probes' raw records alone:
for a run whose lease ended before its report was written, or to judge its probes under another
SLO. Each row: the offered and achieved rate, TTFT p50 and p<ttft_percentile>, mean E2E latency
(each with its block interval over the probe's requests, as the load test computes them), goodput
and the SLO verdict; arms side by side (direct and ``@gateway``).

    python -m pipelines.gpu.probes results/gpu-3/run-2/knee --ttft-ms 300 --percentile 95 --min-goodput 0.95

A probe folder holds ``<arm>/step-<rate>.jsonl`` (or ``.jsonl.gz``), as the load test writes them
under ``runs/<stage>/``. The achieved rate is completed requests over the span from the first
send to the last reply; the GPU's
utilization lives in the load test's report, not in the records, so it is not here.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from workbench.config import SLOConfig
from workbench.loadgen import summary as S
from workbench.loadgen import timestats as ts
from workbench.loadgen.client import Record
from workbench.loadtest.report import read_records

STEP = re.compile(r"step-(?P<rate>[0-9.]+)\.jsonl(\.gz)?$")


def probe_row(arm: str, rate: float, records: list[Record], slo: SLOConfig) -> dict:
    measured = [r for r in records if not r.warmup]
    cols = S.columns(measured, slo)
    segs = cols.seg("n")
    # completed requests over the span from the first send to the last reply: what was carried
    sends = [r.send_s for r in measured if r.send_s is not None]
    ends = [r.end_s for r in measured if r.success and r.end_s is not None]
    span = max(ends) - min(sends) if sends and ends else 0.0
    ttft = ts.percentile(cols.slo_ttft_ms, slo.ttft_percentile, segments=segs)
    verdict = S.slo_verdict(cols, slo, ttft_p=ttft)
    return {"arm": arm, "offered_req_per_s": rate, "requests": cols.n,
            "achieved_req_per_s": len(ends) / span if span > 0 else None,
            "ttft_p50": ts.percentile(cols.slo_ttft_ms, 50, segments=segs), "ttft_p": ttft,
            "e2el_mean": ts.mean(cols.e2el_ms, segments=cols.seg("e2el")),
            "goodput": S.goodput(cols), "slo": verdict.overall.value,
            "slo_parts": {"ttft": verdict.ttft.value if verdict.ttft else None, "goodput": verdict.goodput.value}}


def rows(folder: Path, slo: SLOConfig) -> list[dict]:
    out = []
    for arm_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in arm_dir.iterdir():
            m = STEP.search(f.name)
            if m:
                out.append(probe_row(arm_dir.name, float(m["rate"]), read_records(f), slo))
    if not out:
        raise SystemExit(f"no probe records (<arm>/step-<rate>.jsonl) under {folder}")
    return sorted(out, key=lambda r: (r["offered_req_per_s"], r["arm"]))


def markdown(found: list[dict], slo: SLOConfig) -> str:
    pct = f"{slo.ttft_percentile:g}"
    lines = [f"SLO: TTFT p{pct} <= {slo.ttft_ms:g} ms and >= {slo.min_goodput:.0%} of requests good "
             "(pass / fail only when the whole 95 % interval is on one side)", "",
             f"| offered req/s | arm | requests | achieved req/s | TTFT p50 ms | TTFT p{pct} ms | mean E2E ms "
             "| goodput | SLO (TTFT, goodput) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in found:
        ach = f"{r['achieved_req_per_s']:.1f}" if r["achieved_req_per_s"] else "n/a"
        parts = ", ".join(str(v) for v in r["slo_parts"].values())
        lines.append(f"| {r['offered_req_per_s']:g} | {r['arm']} | {r['requests']} | {ach} | "
                     f"{r['ttft_p50'].text('.1f')} | {r['ttft_p'].text('.1f')} | {r['e2el_mean'].text('.0f')} | "
                     f"{r['goodput'].text('.3f')} | {r['slo']} ({parts}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--ttft-ms", type=float, default=300.0)
    ap.add_argument("--percentile", type=float, default=99.0)
    ap.add_argument("--min-goodput", type=float, default=0.99)
    a = ap.parse_args(argv)
    slo = SLOConfig(ttft_ms=a.ttft_ms, e2el_ms=None, tpot_ms=None, ttft_percentile=a.percentile,
                    min_goodput=a.min_goodput)
    sys.stdout.write(markdown(rows(a.folder, slo), slo))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
