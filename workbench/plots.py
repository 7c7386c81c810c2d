"""Plots: views of typed results, with their intervals as error bars and bands. Shared by the
load-test and report stages; each function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path

from workbench.loadgen.summary import RateSummary
from workbench.stats import Estimate


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(ests: list[Estimate]) -> tuple[list[float], list[list[float]]]:
    """(values, [below, above]) for matplotlib's yerr; an unbounded side is drawn to the value."""
    vals = [e.value for e in ests]
    below = [e.value - e.lo if e.lo is not None else 0.0 for e in ests]
    above = [e.hi - e.value if e.hi is not None else 0.0 for e in ests]
    return vals, [below, above]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return str(path)


def latency_vs_rate(rates: list[RateSummary], path: Path, title: str = "Latency vs offered rate") -> str:
    """TTFT p50 / p99 and E2EL p99 per variant against the offered rate, with 95 % intervals as
    error bars; a p99 with no upper bound (too few requests) is drawn with an open marker."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    variants = list(dict.fromkeys(r.variant for r in rates))
    for i, v in enumerate(variants):
        mine = sorted((r for r in rates if r.variant == v), key=lambda r: r.offered_req_per_s)
        color = f"C{i}"
        for lat, pct, style in (("ttft", 50, "o-"), ("ttft", 99, "o--"), ("e2el", 99, "s:")):
            pts = [(r.offered_req_per_s, r.latency[lat].at(pct)) for r in mine
                   if r.latency[lat].at(pct).value is not None]
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ys, yerr = _err([e for _, e in pts])
            ax.errorbar(xs, ys, yerr=yerr, fmt=style, color=color, capsize=3, ms=4,
                        mfc="white" if any(e.hi is None for _, e in pts) else color,
                        label=f"{v} {lat.upper()} p{pct}")
    ax.set(xlabel="offered rate (req/s)", ylabel="latency (ms)", title=title, yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def ttft_cdf(samples_ms: dict[str, list[float]], path: Path, title: str = "TTFT distribution (CDF)") -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, vals in samples_ms.items():
        vals = sorted(vals)
        if vals:
            ax.step(vals, [(i + 1) / len(vals) for i in range(len(vals))], where="post",
                    label=f"{label} (n={len(vals)})")
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def accuracy_vs_size(points: list[tuple[str, float, Estimate]], path: Path, metric: str) -> str:
    """(variant, MB, accuracy estimate) with the accuracy's Wilson interval as error bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (variant, mb, est) in enumerate(points):
        if est.value is None:
            continue
        ys, yerr = _err([est])
        ax.errorbar([mb], ys, yerr=yerr, fmt="o", color=f"C{i}", capsize=4, label=f"{variant} (n={est.n})")
    ax.set(xlabel="size on disk (MB)", ylabel=f"{metric} (95 % interval)", title="Accuracy vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def latency(rates: list[RateSummary], ttft_ms: dict[str, list[float]], out_dir: Path,
            cdf_title: str = "TTFT distribution (CDF)") -> dict[str, str]:
    """The latency plots of a load test, as the load-test stage (one variant, a CDF per offered
    rate) and the report stage (every variant, a CDF per variant at the target rate) draw them:
    ``latency_vs_rate.png`` with intervals and ``ttft_cdf.png`` of each labelled set of TTFTs (ms,
    as ``loadgen.summary.columns`` extracts them)."""
    return {"latency_vs_rate": latency_vs_rate(rates, out_dir / "latency_vs_rate.png"),
            "ttft_cdf": ttft_cdf(ttft_ms, out_dir / "ttft_cdf.png", cdf_title)}
