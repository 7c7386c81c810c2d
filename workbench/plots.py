"""Plots: views of typed results, with their intervals as error bars and bands. Shared by the
load-test and report stages; each function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
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


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _point(est: Estimate | None) -> tuple[float, float, float] | None:
    """(value, below, above) for an error bar, None when there is no finite value; a side that is
    unbounded or not finite is drawn to the value (the label says so)."""
    v = _finite(est.value) if est is not None else None
    if v is None:
        return None
    lo, hi = _finite(est.lo), _finite(est.hi)
    return v, v - lo if lo is not None else 0.0, hi - v if hi is not None else 0.0


NO_QUALITY_Y = -0.1  # where an arm without a quality figure (speed only) is drawn, labelled


def quality_rate_cost(points: list, path: Path, metric: str) -> str:
    """``quality_rate_cost_figure`` written to ``path``."""
    return _save(quality_rate_cost_figure(points, metric), path)


def quality_rate_cost_figure(points: list, metric: str):
    """One point per arm (``report_details.ArmPoint``): quality against the sustained SLO rate
    (left) and against the cost per million output tokens (right), each with its 95 % interval as
    error bars on both axes. An arm without a quality figure is drawn on a "no quality" line
    below the axis; one whose lowest rate failed, hollow at 0 with its bar to that rate; one
    without a rate or a cost is left out of that panel and named in it. NaN
    counts as missing: it is marked, never drawn as a number, never an error."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    panels = (("sustained_req_per_s", "sustained rate at the SLO (req/s)"),
              ("cost_per_million_output_tokens", "cost per 1e6 output tokens"))
    currencies = sorted({p.cost_currency for p in points if p.cost_currency})
    any_missing_quality = False
    for ax, (field, xlabel) in zip(axes, panels):
        missing = []
        for i, p in enumerate(points):
            est = getattr(p, field)
            x, q = _point(est), _point(p.quality)
            label = p.variant + (f" ({p.engine})" if p.engine else "")
            below = field == "sustained_req_per_s" and x is None and est is not None and _finite(est.hi)
            if below:  # no rate passed, the lowest tried failed: the rate lies in [0, hi)
                x, label = (0.0, 0.0, est.hi), label + f": no rate passed (< {est.hi:g} req/s)"
            if x is None:
                missing.append(p.variant)
                continue
            if q is None:
                any_missing_quality = True
                q, label = (NO_QUALITY_Y, 0.0, 0.0), label + ": no quality"
            if _finite(est.hi) is None:
                label += ", bounded below only" if field == "sustained_req_per_s" else ", no upper bound"
            ax.errorbar([x[0]], [q[0]], xerr=[[x[1]], [x[2]]], yerr=[[q[1]], [q[2]]], fmt="o" if q[0] != NO_QUALITY_Y
                        else "x", color=f"C{i}", capsize=4, ms=max(4, 10 - 2 * i), label=label,
                        mfc="white" if below else None)  # shrinking sizes: coinciding arms stay visible
        if missing:
            what = "sustained rate" if field == "sustained_req_per_s" else "cost"
            ax.text(0.02, 0.02, f"no {what}: {', '.join(missing)}", transform=ax.transAxes, fontsize=8,
                    color="0.3", va="bottom")
        unit = f" ({'/'.join(currencies)})" if field != "sustained_req_per_s" and currencies else ""
        ax.set(xlabel=xlabel + unit)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    # a rate in perspective from 0, where arms with no passing rate sit (a margin keeps them visible)
    axes[0].set_xlim(left=-0.04 * max(axes[0].get_xlim()[1], 1e-9))
    axes[0].set_ylabel(f"{metric} (95 % interval)")
    axes[0].set_ylim(NO_QUALITY_Y - 0.08 if any_missing_quality else -0.02, 1.02)
    if any_missing_quality:
        ticks = [t for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
        axes[0].set_yticks([NO_QUALITY_Y, *ticks], ["no quality", *[f"{t:g}" for t in ticks]])
    fig.suptitle("Quality vs sustained rate and cost, one point per arm", fontsize=10)
    return fig
