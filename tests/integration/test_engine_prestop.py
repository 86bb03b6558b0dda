"""The engines' preStop hooks, as the chart renders them, run for real against a metrics
endpoint on 127.0.0.1 that plays the engine: they return once its running requests reach 0,
give up at drainGraceSeconds when they never do, and return at once when the engine is gone.
(The llama.cpp hook is sh + curl + awk, as in llama.cpp's server image; vLLM's is python3.)"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fleetserve.fleet.processes import LOOPBACK, free_port
from tests.unit.chart_support import need_helm, rendered

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("helm")]
METRIC = {
    "llamacpp": "llamacpp:requests_processing",
    "vllm": 'vllm:num_requests_running{model_name="m"}',
}
# A values file and a model in it that takes drainGraceSeconds from modelDefaults.
MODELS = {"llamacpp": ("cpu-llamacpp", "smollm2"), "vllm": ("gpu-vllm", "qwen-7b")}


@pytest.fixture(scope="module")
def helm() -> None:
    need_helm()


class Engine:
    """Serves /metrics with `running` requests, which drops by one every `polls_per_request`
    scrapes (None: never drops)."""

    def __init__(self, engine: str, running: int, polls_per_request: int | None) -> None:
        self.engine, self.running, self.every = engine, running, polls_per_request
        self.polls = 0
        self.lock = threading.Lock()

    def body(self) -> bytes:
        with self.lock:
            self.polls += 1
            if self.every and self.polls % self.every == 0 and self.running > 0:
                self.running -= 1
            running = self.running
        return f"# TYPE x gauge\n{METRIC[self.engine]} {running}.0\nother_metric 7\n".encode()


Start = Callable[[Engine], int]


@pytest.fixture
def serve() -> Iterator[Start]:
    """Serve an Engine's /metrics on 127.0.0.1; returns its port."""
    servers: list[ThreadingHTTPServer] = []

    def start(engine: Engine) -> int:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                payload = engine.body()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def pre_stop(engine: str, port: int, grace_s: int) -> list[str]:
    name, model = MODELS[engine]
    sets = (f"engines.{engine}.port={port}", "modelDefaults.endpointDelaySeconds=0",
            f"modelDefaults.drainGraceSeconds={grace_s}")  # fmt: skip
    objects = rendered(name, *sets).objects
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"
                     and o["metadata"]["labels"].get("fleetserve.dev/model") == model]  # fmt: skip
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command: list[str] = container["lifecycle"]["preStop"]["exec"]["command"]
    return command


def run(command: list[str], limit_s: float) -> float:
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit_s, check=False)
    assert done.returncode == 0, done.stderr
    return time.monotonic() - started


@pytest.mark.parametrize("engine", ["llamacpp", "vllm"])
def test_returns_once_the_running_requests_finish(engine: str, serve: Start) -> None:
    fake = Engine(engine, running=2, polls_per_request=2)
    port = serve(fake)
    elapsed = run(pre_stop(engine, port, grace_s=30), limit_s=30)
    assert fake.running == 0
    assert fake.polls == 4  # drained on the 4th scrape, and not one scrape more
    assert elapsed < 10


@pytest.mark.parametrize("engine", ["llamacpp", "vllm"])
def test_gives_up_at_the_drain_grace(engine: str, serve: Start) -> None:
    fake = Engine(engine, running=1, polls_per_request=None)
    port = serve(fake)
    elapsed = run(pre_stop(engine, port, grace_s=2), limit_s=20)
    assert fake.running == 1
    assert 1 <= elapsed < 5


@pytest.mark.parametrize("engine", ["llamacpp", "vllm"])
def test_returns_at_once_when_the_engine_is_gone(engine: str) -> None:
    elapsed = run(pre_stop(engine, free_port(), grace_s=30), limit_s=20)
    assert elapsed < 5
