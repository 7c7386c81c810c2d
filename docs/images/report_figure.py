"""The README's picture of the report, drawn from every variant's headline numbers, with
workbench.plots' interval helpers:

    python docs/images/report_figure.py                          # the committed AVX-512 run's
    python docs/images/report_figure.py reports/report/all.json  # your own `dvc repro`'s

Input: a report stage's all.json, or results/cpu-avx512/metrics.json (the same numbers as the
report stage wrote them into metrics.json before it held the recommended variant's alone).

Left: MMLU-smoke accuracy per variant (Wilson intervals, 30 questions), as the report's
accuracy-vs-size view has it. Right: each variant's perplexity change against base on the same 20
documents (paired bootstrap intervals), the criterion that decided.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench import plots
from workbench.stats import Estimate

ROOT = Path(__file__).resolve().parents[2]


def per_variant(doc: dict) -> tuple[dict[str, dict[str, float]], str | None]:
    """({variant: {key: value}}, the recommended variant) of an all.json ("<variant>.<key>" in its
    ``metrics``) or of the earlier per-variant metrics.json."""
    if "metrics" not in doc:
        return {v: d for v, d in doc.items() if isinstance(d, dict)}, doc.get("recommended")
    out: dict[str, dict[str, float]] = {}
    for name, value in doc["metrics"].items():
        variant, key = name.split(".", 1)
        out.setdefault(variant, {})[key] = value
    return out, doc["details"]["recommendation"]["variant"]


def main(report: Path = ROOT / "results/cpu-avx512/metrics.json", out: Path = ROOT / "docs/images/report.png") -> str:
    m, recommended = per_variant(json.loads(Path(report).read_text()))
    variants = [v for v, d in m.items() if "mmlu_acc" in d]
    labels = [f"{v}\n{m[v]['mb']:.0f} MB" for v in variants]
    plt = plots._plt()
    fig, (acc, ppl) = plt.subplots(1, 2, figsize=(9, 3.3))
    for i, v in enumerate(variants):
        d = m[v]
        ys, yerr = plots._err([Estimate(value=d["mmlu_acc"], lo=d["mmlu_acc_ci_lo"], hi=d["mmlu_acc_ci_hi"])])
        acc.errorbar([i], ys, yerr=yerr, fmt="o", color=f"C{i}", capsize=4)
        if "ppl_change_pct" in d:  # the baseline has no change to itself
            ys, yerr = plots._err([Estimate(value=d["ppl_change_pct"], lo=d["ppl_change_pct_ci_lo"],
                                            hi=d["ppl_change_pct_ci_hi"])])
            ppl.errorbar([i], ys, yerr=yerr, fmt="o", color=f"C{i}", capsize=4)
    ppl.axhline(0, color="C0", lw=1, ls="--")
    acc.set(ylabel="accuracy, 95 % interval", title="MMLU-smoke accuracy (30 questions)\nhigher is better")
    ppl.set(ylabel="% vs base, 95 % interval",
            title="Perplexity change vs base (same 20 documents)\n"
                  f"lower is better; recommended: {recommended}")
    for ax in (acc, ppl):
        ax.set_xticks(range(len(variants)), labels, fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return str(out)


if __name__ == "__main__":
    import sys

    print(main(*sys.argv[1:2]))
