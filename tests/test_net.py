"""workbench/net.py: the one free-port helper and the one readiness poll every local server uses."""

import socket
import subprocess
import sys
import time

from workbench.net import free_port, wait_http_ok
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
