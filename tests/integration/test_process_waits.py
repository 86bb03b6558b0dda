"""The one blocking readiness wait (`fleet.processes.poll_http_ok`) and the ManagedProcess
waits built on it, against real processes on 127.0.0.1: ready, exited, never ready."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fleetserve.fleet.processes import free_port, poll_http_ok
from fleetserve.testing.processes import ManagedProcess, StartError, get_json

pytestmark = pytest.mark.integration

SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"ok": true}' if self.path == "/health" else b"{}"
        self.send_response(200 if self.path == "/health" else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_ready_once_it_answers_200(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-c", SERVER, str(port)]
    with ManagedProcess(argv, log_path=tmp_path / "server.log") as server:
        waited_s = server.wait_ready(f"http://127.0.0.1:{port}/health", 10)
        assert waited_s < 10
        assert get_json(f"http://127.0.0.1:{port}/health") == {"ok": True}
        with pytest.raises(OSError, match="503"):
            get_json(f"http://127.0.0.1:{port}/other")
        wait = poll_http_ok(f"http://127.0.0.1:{port}/other", 0.2)
        assert (wait.ready, wait.exited, wait.last) == (False, False, "status 503")


def test_a_process_that_exits_fails_at_once_with_its_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "print('no model here'); raise SystemExit(3)"]
    with ManagedProcess(argv, log_path=tmp_path / "engine.log") as engine:
        with pytest.raises(StartError, match="exited with status 3") as info:
            engine.wait_ready(f"http://127.0.0.1:{free_port()}/health", 30)
        assert "no model here" in str(info.value)


def test_nothing_answering_times_out(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    with ManagedProcess(argv, log_path=tmp_path / "idle.log") as idle:
        with pytest.raises(StartError, match=r"not 200 within 0.3 s \(no answer\)"):
            idle.wait_ready(f"http://127.0.0.1:{free_port()}/health", 0.3)
        with pytest.raises(TimeoutError, match="the thing"):
            idle.wait_for(lambda: False, 0.3, "the thing", poll_s=0.05)
