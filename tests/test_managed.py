"""workbench/managed.py: the process life cycle vLLM and llama.cpp share, on tiny stand-in servers."""

import sys
import time

import httpx
import psutil
import pytest

from workbench.managed import ManagedServer, ServerError

HEALTHY = """
import http.server, subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a worker, as vLLM has
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
print("stand-in serving", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class StandIn(ManagedServer):
    kind = "stand-in"

    def __init__(self, script: str, log_path):
        self.script = script
        super().__init__("127.0.0.1", None, log_path, startup_timeout_s=20, shutdown_grace_s=5,
                         log_prefix="standin")

    @property
    def label(self) -> str:
        return "a script"

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script, str(self.port)]


def test_ready_when_health_answers_and_stop_ends_the_whole_group(tmp_path):
    with StandIn(HEALTHY, tmp_path / "log") as server:
        assert httpx.get(f"{server.root_url}/health").status_code == 200
        assert server.startup_s is not None and server.base_url.endswith("/v1")
        group = [server.proc.pid, *(c.pid for c in psutil.Process(server.proc.pid).children(recursive=True))]
        assert len(group) == 2
    time.sleep(0.2)
    assert not [p for p in group if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert "stand-in serving" in (tmp_path / "log").read_text()


def test_a_server_that_dies_while_starting_raises_with_its_log_tail(tmp_path):
    dying = "import sys; print('cannot load the weights: out of memory', flush=True); sys.exit(3)"
    with pytest.raises(ServerError) as err:
        with StandIn(dying, tmp_path / "log"):
            pass
    assert "stand-in exited with code 3 while starting a script" in str(err.value)
    assert "cannot load the weights: out of memory" in str(err.value)


def test_a_server_that_never_gets_healthy_is_stopped_after_the_timeout(tmp_path):
    silent = "import time; print('still loading', flush=True); time.sleep(120)"
    server = StandIn(silent, tmp_path / "log")
    server.start()
    pid = server.proc.pid
    with pytest.raises(ServerError, match="not ready after 2 s"):
        server.wait_ready(timeout_s=2)
    assert server.proc is None and not (psutil.pid_exists(pid) and
                                         psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)


def test_a_servers_api_key_never_reaches_the_shown_command_or_its_log(caplog):
    # the vllm-server evaluate backend and the load test wrote vLLM's --api-key into their reports
    from workbench.config import ServerConfig
    from workbench.managed import redact
    from workbench.serve import VLLMServer

    server = VLLMServer(ServerConfig(model_dir="models/base", api_key="sk-secret-123", served_name="m"))
    shown = server.shown_command()
    assert "sk-secret-123" not in shown and "--api-key ***" in shown and "--served-model-name m" in shown
    assert redact(["x", "--api-key=sk-1", "--port", "8"]) == "x --api-key=*** --port 8"
