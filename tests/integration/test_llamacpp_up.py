"""The embedded default for real: `fleetserve up` serving SmolLM2 on llama.cpp replicas.

Needs llama-server built (`make test` builds it first); a missing build fails the test with
the message saying how to build it, rather than skipping.
"""

from __future__ import annotations

import signal

import psutil
import pytest
from openai import OpenAI

from fleetserve.engines.llamacpp.build import find_llama_server
from fleetserve.engines.llamacpp.model import DEFAULT_MODEL_NAME
from fleetserve.fleet.processes import free_port, port_is_free
from fleetserve.testing.stack import fleetserve_argv, services
from tests.integration.test_up import get_json, reap_on_exit, wait_serving

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_up_serves_a_real_model_on_llamacpp() -> None:
    find_llama_server()
    port = free_port()
    children: list[psutil.Process] = []
    argv = fleetserve_argv("up", "--replicas", "2", "--port", str(port))
    with services() as started, reap_on_exit(children):
        up = started.start("up", argv, port)
        with OpenAI(base_url=up.url + "/v1", api_key="sk-test", max_retries=0, timeout=60) as c:
            wait_serving(c, up, children, model=DEFAULT_MODEL_NAME)
            # Greedy answers of this 135M model to these phrasings (checked on llama.cpp).
            system = "You are a helpful assistant. Answer in one short sentence."
            for messages in (
                [{"role": "user", "content": "Which city is the capital of France?"}],
                [{"role": "system", "content": system},
                 {"role": "user", "content": "What is the capital of France?"}],
            ):  # fmt: skip
                answer = c.chat.completions.create(
                    model=DEFAULT_MODEL_NAME,
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=24,
                    temperature=0,
                )
                text = answer.choices[0].message.content or ""
                assert "Paris" in text, text
                assert answer.usage is not None
                assert answer.usage.completion_tokens > 0

            stream = c.chat.completions.create(
                model=DEFAULT_MODEL_NAME,
                messages=[{"role": "user", "content": "Name three colours."}],
                max_tokens=16,
                temperature=0,
                stream=True,
            )
            pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
            assert len([p for p in pieces if p]) > 3  # it streamed piece by piece
            assert "".join(pieces).strip()
        fleet = get_json(up.url, "/admin/fleet")
        replicas = fleet["replicas"]
        assert isinstance(replicas, list)
        assert [r["state"] for r in replicas] == ["ready", "ready"]
        engine_ports = [int(str(r["url"]).rsplit(":", 1)[1]) for r in replicas]

        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(20) == 0, up.process.log_text()
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive
        for p in (port, *engine_ports):
            assert port_is_free(p)


@pytest.mark.timeout(120)
def test_up_autoscaled_from_zero_on_llamacpp() -> None:
    """The embedded default, autoscaled: a request at zero replicas starts one and is answered."""
    find_llama_server()
    port = free_port()
    children: list[psutil.Process] = []
    argv = fleetserve_argv("up", "--replicas", "0:2", "--port", str(port))
    with services() as started, reap_on_exit(children):
        up = started.start("up", argv, port)
        up.wait_ok("/health", timeout_s=30)
        assert get_json(up.url, "/admin/fleet")["replicas"] == []
        with OpenAI(base_url=up.url + "/v1", api_key="sk-test", max_retries=0, timeout=90) as c:
            answer = c.chat.completions.create(
                model=DEFAULT_MODEL_NAME,
                messages=[{"role": "user", "content": "Which city is the capital of France?"}],
                max_tokens=24,
                temperature=0,
            )
        assert "Paris" in (answer.choices[0].message.content or "")
        replicas = get_json(up.url, "/admin/fleet")["replicas"]
        assert isinstance(replicas, list)
        assert [r["state"] for r in replicas] == ["ready"]
        children.extend(psutil.Process(up.pid).children(recursive=True))
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(20) == 0, up.process.log_text()
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive
        assert port_is_free(port)
