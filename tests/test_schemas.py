"""Typed report details and their published JSON Schemas (workbench/schemas.py, issue 29)."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from workbench import prepare, quantize, schemas, shard, speed, variants
from workbench.evaluate.details import EvaluateDetails
from workbench.loadgen.summary import RateSummary, StepSummary
from workbench.loadtest.details import ArmDetails, ComparedDetails
from workbench.quantize.details import QuantizeDetails
from workbench.report import cell_text, tables
from workbench.report_details import ReportDetails
from workbench.reports import Report, read_report

ROOT = Path(__file__).resolve().parents[1]


def test_committed_schemas_match_the_models():
    assert schemas.stale(ROOT / "docs/schemas") == [], "run: python -m workbench.schemas --out docs/schemas"


def test_a_changed_model_makes_its_committed_schema_stale(tmp_path):
    assert schemas.main(["--out", str(tmp_path)]) == 0 and schemas.main(["--check", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    data["$defs"]["QuantRow"]["properties"].pop("ppl_change_vs_base")
    (tmp_path / "report.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    assert schemas.stale(tmp_path) == ["report.json"] and schemas.main(["--check", str(tmp_path)]) == 1


def test_schemas_describe_the_typed_details():
    report = schemas.schema("report")
    row = report["$defs"]["QuantRow"]["properties"]
    assert {"ppl_change_vs_base", "mmlu_vs_base", "sustained_req_per_s"} <= set(row)
    assert report["$defs"]["ReportDetails"]["additionalProperties"] is False  # extra="forbid"
    assert "VsBaseline" in schemas.schema("evaluate")["$defs"]
    assert "StepSummary" in schemas.schema("loadtest")["$defs"]
    for name, part in (("prepare", "ModelCard"), ("quantize", "QuantCheck"), ("shard", "Reload"),
                       ("speed", "RooflineRow")):
        defs = schemas.schema(name)["$defs"]
        assert part in defs and defs[f"{name.capitalize()}Details"]["additionalProperties"] is False, name


def _untyped_readers_accept(d: dict) -> bool:
    """Whether the readers before typed details (loadtest.steps_of / rates_of) read this report."""
    try:
        [StepSummary.model_validate(s) for s in d["details"].get("steps", [])]
        [RateSummary.model_validate(r) for r in d["details"].get("rates", [])]
    except ValidationError:
        return False
    return True


def test_every_committed_report_still_loads_typed():
    """Backward compatibility: reports already on disk (results/) load through the typed models,
    except those the untyped readers could not read either (results/gpu's first load tests,
    written before StepSummary had ``variant``)."""
    loaded: dict[str, int] = {}
    for path in sorted((ROOT / "results").rglob("*.json")):
        d = json.loads(path.read_text())
        if not (isinstance(d, dict) and "stage" in d and "details" in d):
            continue
        Report.model_validate(d)  # the envelope every report shares
        name = d["stage"]
        name = "loadtest" if d["stage"].startswith("speed/") else name  # the speed stage's load tests
        name = "loadtest-all" if name == "loadtest" and d["variant"] == variants.ALL else name
        if not _untyped_readers_accept(d):
            continue
        schemas.REPORTS[name][0].model_validate(d)  # raises, naming the field, if one no longer loads
        loaded[name] = loaded.get(name, 0) + 1
    assert loaded.keys() == schemas.REPORTS.keys() - {"common"}, loaded  # every stage has one committed
    assert min(loaded[n] for n in ("prepare", "quantize", "evaluate", "loadtest", "report")) >= 3, loaded


def test_a_committed_report_reads_back_as_typed_objects():
    r = read_report(ROOT / "results/gpu-2/report/all.json")
    d = ReportDetails.of(r)
    rows = {row.variant: row for row in d.quantization_table}
    assert d.baseline == variants.BASE  # written before the baseline was recorded: base
    assert rows["gptq-int4"].ppl_change_vs_base.diff.value is not None and rows["base"].ppl_change_vs_base is None
    quant, load, decision = tables(r)
    assert decision.variant == d.recommendation.variant and len(load) == len(d.load_table)
    assert quant.set_index("variant").loc["gptq-int4", "perplexity vs base"].endswith(")")  # with its verdict
    ev = EvaluateDetails.of(read_report(ROOT / "results/gpu-2/evaluate/gptq-int4.json"))
    assert ev.evaluated and ev.vs_baseline.baseline == "base" and ev.vs_baseline.paired["mmlu"].n > 0
    all_lt = read_report(ROOT / "results/gpu-2/loadtest/all.json")
    assert isinstance(ComparedDetails.of(all_lt).drifted, bool)
    assert ArmDetails.of(read_report(ROOT / "results/gpu-2/loadtest/base.json")).rates


def test_a_closed_loop_step_written_with_a_null_rate_reads_back_unbounded():
    """JSON has no infinity: a closed-loop step's rate is written as null (results/gpu-3), and the
    arm's details must still load, or the stage's own check before writing would refuse them."""
    d = ArmDetails.of(read_report(ROOT / "results/gpu-3/concurrency/llama-3.1-8b-fp8.json"))
    closed = [s for s in d.steps if s.concurrency is not None]
    assert closed and all(s.offered_req_per_s == float("inf") for s in closed)
    assert json.loads(closed[0].model_dump_json())["offered_req_per_s"] is None  # and written as before


def test_cell_text_is_told_the_type_not_guessed():
    """It used to take an Estimate for a Comparison unless the dict had a "diff" key."""
    row = ReportDetails.of(read_report(ROOT / "results/gpu-2/report/all.json")).quantization_table[1]
    assert cell_text(row.ppl_change_vs_base, "+.1f", " %").endswith(f"n = {row.ppl_change_vs_base.n})")
    assert cell_text(row.ppl_word, ".2f").endswith("]") and cell_text(None, ".2f") == ""


def test_details_that_do_not_fit_the_schema_are_refused_before_writing():
    with pytest.raises(ValidationError, match="suits"):
        EvaluateDetails.checked({"backend": {"name": "vllm"}, "suits": {}})
    ok = {"backend": {"name": "vllm", "vllm_version": "0.32"}, "suites": {}, "timings": {"mmlu_s": 1.0}}
    assert EvaluateDetails.checked(ok) is ok  # written as it was: the JSON does not change
    with pytest.raises(ValidationError, match="knee"):
        ArmDetails.checked({"knee": {"lo": "fast"}})


def test_an_untyped_report_and_a_typed_one_give_the_same_details():
    r = read_report(ROOT / "results/gpu-2/report/all.json")
    typed = schemas.REPORTS["report"][0].model_validate(r.model_dump(mode="json"))
    assert ReportDetails.of(typed) is typed.details
    assert ReportDetails.of(r) == typed.details
    assert isinstance(Report.model_validate(typed.model_dump(mode="json")).details, dict)


# A committed report of each stage typed here, and a field of its details to misspell (a path of keys).
MISSPELT = {
    "prepare": ("results/gpu-2/prepare/base.json", prepare.PrepareDetails, ["model"], "parameters", "paramaters"),
    "quantize": ("results/gpu-2/quantize/gptq-int4.json", QuantizeDetails, ["check"], "perplexity_ratio",
                 "perplexity_ration"),
    "shard": ("results/gpu/shard/base.json", shard.ShardDetails, ["reload"], "success", "sucess"),
    "speed": ("results/gpu-3/summary.json", speed.SpeedDetails, ["roofline", 0], "tpot_ms_p50", "tpot_p50_ms"),
}


@pytest.mark.parametrize("stage", sorted(MISSPELT))
def test_a_misspelled_or_missing_details_field_is_refused_naming_it(stage):
    """Writer (``checked``, before writing) and readers (``of``) alike: a renamed field fails
    loudly, where it is, instead of reading as absent."""
    path, model, where, field, typo = MISSPELT[stage]
    report = read_report(ROOT / path)
    assert model.checked(report.details) is report.details  # as committed, it fits
    bad = json.loads(json.dumps(report.details))
    inner = bad
    for key in where:
        inner = inner[key]
    inner[typo] = inner.pop(field)
    for refuse in (lambda: model.checked(bad), lambda: model.of(report.model_copy(update={"details": bad}))):
        with pytest.raises(ValidationError) as err:
            refuse()
        assert typo in str(err.value) and field in str(err.value)  # the stray name and the missing one
    del inner[typo]
    with pytest.raises(ValidationError, match=field):
        model.checked(bad)


def test_the_notebook_tables_of_prepare_and_quantize_read_typed_details():
    prep = prepare.summary(read_report(ROOT / "results/gpu-2/prepare/base.json"))
    assert prep.loc[0, "parameters"] > 0 and len(prep.loc[0, "sha256"]) == 12
    quant = quantize.summary([read_report(ROOT / "results/gpu-2/quantize/gptq-int4.json")])
    assert quant.loc[0, "bits"] == 4 and quant.loc[0, "answer"]


def test_reports_written_before_a_field_existed_read_it_as_its_default():
    """results/gpu-3 (2026-12-05) has no loaded_gib / precision_as_asked in its roofline rows."""
    d = speed.SpeedDetails.of(read_report(ROOT / "results/gpu-3/summary.json"))
    row = d.roofline[0]
    assert row.loaded_gib is None and row.precision_as_asked and row.tpot_ms_p50.value > 0
    assert d.concurrency.report.endswith("all.json") and d.knee is None
    assert shard.ShardDetails.of(read_report(ROOT / "results/gpu/shard/base.json")).bytes_per_rank[0] > 0
