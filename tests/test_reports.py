import json

import pytest

from workbench.reports import (SCHEMA_VERSION, Report, atomic_dir, read_report, tree_fingerprint,
                               write_json_atomic, write_report)


def test_report_records_provenance_config_and_schema(tmp_path):
    r = Report(stage="prepare", variant="base", config={"dtype": "bfloat16"}, metrics={"x_s": 1.0})
    path = write_report(r, tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["config"] == {"dtype": "bfloat16"}
    prov = data["provenance"]
    assert prov["python"] and prov["platform"]
    assert "torch" in prov["packages"] and "workbench" in prov["packages"]
    assert "git_sha" in prov
    assert read_report(path).metrics == {"x_s": 1.0}


def test_reading_a_report_of_another_schema_version_fails_clearly(tmp_path):
    p = tmp_path / "old.json"
    p.write_text(json.dumps({"schema_version": 0}))
    with pytest.raises(ValueError, match="schema_version"):
        read_report(p)


def test_failed_json_write_leaves_previous_file_intact(tmp_path):
    p = write_json_atomic(tmp_path / "r.json", {"ok": 1})
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular"):
        write_json_atomic(p, circular)
    assert json.loads(p.read_text()) == {"ok": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]


def test_stage_that_dies_leaves_no_half_written_folder(tmp_path):
    final = tmp_path / "models" / "base"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (final / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in final.parent.iterdir()) == ["base"]


def test_tree_fingerprint_changes_with_content(tmp_path):
    (tmp_path / "f").write_text("a")
    one = tree_fingerprint(tmp_path)
    (tmp_path / "f").write_text("b")
    assert tree_fingerprint(tmp_path)["sha256"] != one["sha256"]
    assert one["files"] == 1 and one["bytes"] == 1
