"""``workbench gateway`` commands failing clearly (a missing config, word list or audit database, a
bad --since, a zero limit), key revocation, and the key store's reload (workbench/gateway/keys.py).
Keys reloaded in a running gateway: test_gateway_http.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from gateway_helpers import KEY, ROOT, make_cfg
from workbench.cli import main as workbench
from workbench.gateway.config import GatewayConfigError, HttpConfig, KeyConfig, LimitsConfig, load_config
from workbench.gateway.keys import KeyStore, hash_key


@pytest.fixture
def conf(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"keys_file": str(tmp_path / "keys.yaml"), "filter": {"enabled": False},
                                    "audit": {"path": str(tmp_path / "audit.sqlite")}}))
    return path


def test_shipped_config_loads_and_states_the_default_limits(monkeypatch):
    monkeypatch.chdir(ROOT)  # its word lists are relative to the repository root
    cfg = load_config("deploy/gateway.yaml")
    assert cfg.http == HttpConfig()  # the file documents the defaults, it does not change them
    assert cfg.limits.max_header_bytes == LimitsConfig().max_header_bytes == 64 * 1024


# ---- failing clearly ------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [["--rpm", "0"], ["--tpm", "0"], ["--rpm", "-5"], ["--tpm", "nan"]])
def test_add_key_refuses_a_zero_or_negative_limit(conf, tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exc:
        workbench(["gateway", "--config", str(conf), "add-key", "team-a", *flags])
    assert exc.value.code == 2
    assert "must be above 0" in capsys.readouterr().err
    assert not (tmp_path / "keys.yaml").exists()  # no unlimited key was created


def test_missing_config_outside_the_repository_is_an_error_naming_its_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert workbench(["gateway", "prune"]) == 2
    assert str(tmp_path / "deploy/gateway.yaml") in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no audit database made up from defaults
    with pytest.raises(GatewayConfigError, match="gateway config not found"):
        load_config()


def test_missing_word_list_is_an_error_naming_it(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"filter": {"word_lists": ["lists/words.txt"]}}))
    with pytest.raises(GatewayConfigError, match="lists/words.txt"):
        load_config(path)


@pytest.mark.parametrize("command", [["prune"], ["export-audit"]])
def test_prune_and_export_on_a_missing_database_fail_without_creating_one(conf, tmp_path, capsys, command):
    assert workbench(["gateway", *command, "--config", str(conf)]) == 2
    assert f"audit database not found: {tmp_path / 'audit.sqlite'}" in capsys.readouterr().err
    assert not (tmp_path / "audit.sqlite").exists()


def test_since_that_is_no_date_is_a_clear_error(conf, capsys):
    with pytest.raises(SystemExit) as exc:
        workbench(["gateway", "export-audit", "--config", str(conf), "--since", "yesterday"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'yesterday' is neither an ISO date/time" in err and "Traceback" not in err


# ---- revoke-key ------------------------------------------------------------------------------
def test_revoke_key_removes_only_that_key(conf, capsys):
    for key_id in ("team-a", "team-b"):
        assert workbench(["gateway", "--config", str(conf), "add-key", key_id]) == 0
    assert workbench(["gateway", "--config", str(conf), "revoke-key", "team-a"]) == 0
    assert [k.id for k in load_config(conf).all_keys()] == ["team-b"]
    capsys.readouterr()
    assert workbench(["gateway", "--config", str(conf), "revoke-key", "team-a"]) == 2
    assert "no key 'team-a'" in capsys.readouterr().err


def test_revoke_key_names_an_inline_key_it_cannot_remove(tmp_path, capsys):
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"keys": [{"id": "inline", "sha256": hash_key(KEY)}],
                                    "filter": {"enabled": False}}))
    assert workbench(["gateway", "--config", str(path), "revoke-key", "inline"]) == 2
    assert "inline under `keys:`" in capsys.readouterr().err


# ---- reload ----------------------------------------------------------------------------------
def test_reload_keeps_the_buckets_of_unchanged_keys_and_drops_revoked_ones():
    a = KeyConfig(id="a", sha256=hash_key("wb-a"), requests_per_minute=2)
    b = KeyConfig(id="b", sha256=hash_key("wb-b"))
    store = KeyStore([a])
    bucket = store.lookup(b"Bearer wb-a").requests
    assert bucket.take() == 0 and bucket.take() == 0 and bucket.take() > 0  # spent
    store.reload([a, b])
    assert store.lookup(b"Bearer wb-a").requests.take() > 0  # still spent: a reload is no refill
    assert store.lookup(b"Bearer wb-b").id == "b"
    store.reload([a.model_copy(update={"requests_per_minute": 60}), b])
    assert store.lookup(b"Bearer wb-a").requests.take() == 0  # a changed limit starts afresh
    store.reload([b])
    assert store.lookup(b"Bearer wb-a") is None


def test_a_broken_keys_file_keeps_the_current_keys(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([{"id": "a", "sha256": hash_key("wb-a")}]))
    from workbench.gateway.keys import reload_keys

    cfg = make_cfg(tmp_path, {}, filter={"enabled": False}).model_copy(update={"keys_file": str(keys_file)})
    app = SimpleNamespace(cfg=cfg, keys=KeyStore(cfg.all_keys()))  # what reload_keys reads
    keys_file.write_text("- {id: a, sha256: [unclosed\n")
    assert reload_keys(app) is False
    assert app.keys.lookup(b"Bearer wb-a").id == "a"
    keys_file.write_text(yaml.safe_dump([{"id": "a", "sha256": "0" * 63}]))  # not a SHA-256
    assert reload_keys(app) is False and app.keys.lookup(b"Bearer wb-a").id == "a"
