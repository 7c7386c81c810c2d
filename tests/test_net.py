"""workbench/net.py: the one free-port helper, the one readiness poll and the one start-and-wait
(ServerProcess: the gateway, Redis) every local server uses."""

import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from workbench.gateway.process import GatewayProcess
from workbench.net import ServerError, ServerProcess, free_port, redis_answers, redis_server, wait_http_ok
from workbench.testing.fakeserver import FakeServer


def test_free_port_can_be_bound_at_once():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # raises if something still holds it


def test_wait_http_ok_is_true_once_the_server_answers():
    with FakeServer() as fake:
        assert wait_http_ok(f"{fake.root_url}/health", 10)


def test_wait_http_ok_gives_up_as_soon_as_the_process_exits():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    t0 = time.monotonic()
    assert not wait_http_ok(f"http://127.0.0.1:{free_port()}/health", 60, proc)
    assert time.monotonic() - t0 < 30 and proc.returncode == 3


def test_wait_http_ok_times_out_where_nothing_listens_and_reports_progress():
    notes = []
    t0 = time.monotonic()
    assert not wait_http_ok(f"http://127.0.0.1:{free_port()}/health", 0.6, interval_s=0.05,
                            progress=lambda: notes.append(time.monotonic()), progress_every_s=0.2)
    assert 0.6 <= time.monotonic() - t0 < 10
    assert len(notes) >= 1


# ---- ServerProcess: start, wait until ready, stop --------------------------------------------

def test_server_process_is_ready_on_enter_and_stopped_on_exit(tmp_path):
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], port,
                           ready_path="/", cwd=tmp_path, log_path=tmp_path / "http.log")
    with server:
        assert httpx.get(server.root_url + "/", timeout=10).status_code == 200  # answering on enter
    assert server.proc.poll() is not None  # and gone after exit
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.root_url + "/", timeout=2)


def test_server_process_that_exits_raises_with_its_code_and_log_tail(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('bad key: porrt'); sys.exit(3)"]
    with pytest.raises(ServerError, match=r"(?s)toy on port \d+ exited with code 3:.*bad key: porrt"):
        with ServerProcess(argv, free_port(), name="toy", log_path=tmp_path / "toy.log"):
            pass


def test_server_process_that_never_answers_is_stopped_after_its_timeout(tmp_path):
    server = ServerProcess([sys.executable, "-c", "import time; time.sleep(600)"], free_port(), name="mute",
                           timeout_s=0.5, grace_s=5)
    with pytest.raises(ServerError, match="mute on port .* did not answer within 0.5 s"):
        server.__enter__()
    assert server.proc.poll() is not None  # not left running


def test_gateway_process_serves_health_on_the_port_it_was_given(tmp_path):
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"port": free_port(), "upstreams": {}, "audit": {"enabled": False}}))
    with GatewayProcess(config, port, log_path=tmp_path / "gw.log") as gw:  # --port overrides the file's
        assert gw.port == port and httpx.get(gw.root_url + "/health", timeout=10).status_code == 200


def test_gateway_process_with_a_bad_config_names_the_key(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"upstreamz": {}}))
    with pytest.raises(ServerError, match=r"(?s)gateway on port \d+ exited with code \d+:.*upstreamz"):
        with GatewayProcess(config, free_port(), log_path=tmp_path / "gw.log"):
            pass


def test_redis_server_answers_ping_until_stopped(redis_exe, tmp_path):
    port = free_port()
    assert not redis_answers(port)
    with redis_server(redis_exe, port, tmp_path):
        assert redis_answers(port)
    assert not redis_answers(port)
