"""The Locust example (examples/) builds valid requests and reads streams right, without Locust.

`examples/locust_requests.py` holds everything but the Locust classes; the locustfile itself is
checked by parsing it: every name it imports from fleetserve or from its helper must exist.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

from fleetserve.engines.sim.text import count_tokens
from fleetserve.errors import ConfigError
from fleetserve.protocol.openai import ChatCompletionRequest, CompletionRequest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def helper() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "locust_requests", EXAMPLES / "locust_requests.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _bodies(helper: ModuleType, options: dict[str, str], count: int) -> list[dict[str, Any]]:
    workload = helper.build_workload(options)
    out = []
    for _ in range(count):
        request = workload.next()
        body = orjson.loads(request.body)
        assert isinstance(body, dict)
        out.append({"path": request.path, "stream": request.stream, **body})
    return out


# --- request bodies ------------------------------------------------------------------------------


def test_chat_bodies_are_valid_openai_requests_of_the_asked_lengths(helper: ModuleType) -> None:
    options = {"model": "llama", "prompt_tokens": "uniform:lo=8,hi=64", "output_tokens": "16"}
    for body in _bodies(helper, options, 20):
        assert body["path"] == "/v1/chat/completions"
        request = ChatCompletionRequest.model_validate(body)
        assert request.model == "llama"
        assert request.stream is True
        assert request.include_usage
        assert request.token_limit == 16
        assert len(request.messages) == 1
        assert 8 <= count_tokens(request.messages[0].text()) <= 64


def test_completions_without_streaming(helper: ModuleType) -> None:
    options = {"model": "m", "api": "completions", "stream": "false", "prompt_tokens": "5"}
    (body,) = _bodies(helper, options, 1)
    assert body["path"] == "/v1/completions"
    assert body["stream"] is False
    request = CompletionRequest.model_validate(body)
    assert isinstance(request.prompt, str)
    assert count_tokens(request.prompt) == 5
    assert request.max_tokens == 128  # the default output length
    assert "stream" not in body or body["stream"] is False


def test_shared_prefix_goes_in_a_system_message(helper: ModuleType) -> None:
    options = {"model": "m", "prompt_tokens": "4", "prefix_groups": "2", "prefix_tokens": "50"}
    systems = set()
    for body in _bodies(helper, options, 30):
        request = ChatCompletionRequest.model_validate(body)
        system, user = request.messages
        assert system.role == "system"
        assert count_tokens(system.text()) == 50
        assert user.role == "user"
        assert count_tokens(user.text()) == 4
        systems.add(system.text())
    assert len(systems) == 2


def test_same_seed_same_bodies_other_seed_other_bodies(helper: ModuleType) -> None:
    base = {"model": "m", "prompt_tokens": "32"}
    first = _bodies(helper, {**base, "seed": "7"}, 5)
    assert _bodies(helper, {**base, "seed": "7"}, 5) == first
    assert _bodies(helper, {**base, "seed": "8"}, 5) != first


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({}, "--model", id="no-model"),
        pytest.param({"model": " "}, "--model", id="blank-model"),
        pytest.param({"model": "m", "api": "embeddings"}, "chat or completions", id="bad-api"),
        pytest.param({"model": "m", "stream": "maybe"}, "true or false", id="bad-stream"),
        pytest.param({"model": "m", "prompt_tokens": "lots"}, "whole number", id="bad-length"),
        pytest.param({"model": "m", "prefix_groups": "x"}, "--prefix-groups", id="bad-groups"),
        pytest.param({"model": "m", "prefix_groups": "2"}, "both groups", id="prefix-no-tokens"),
        pytest.param({"model": "m", "seed": "one"}, "--seed", id="bad-seed"),
    ],
)
def test_bad_options_say_what_is_wrong(
    helper: ModuleType, options: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        helper.build_workload(options)


def test_options_from_env_and_headers(helper: ModuleType) -> None:
    options = helper.options_from_env({"FLEETSERVE_MODEL": "qwen", "FLEETSERVE_OUTPUT_TOKENS": "9"})
    assert options["model"] == "qwen"
    assert options["output_tokens"] == "9"
    assert options["api"] == "chat"
    assert options["api_key"] == ""
    assert "Authorization" not in helper.request_headers("")
    assert helper.request_headers("sk-1")["Authorization"] == "Bearer sk-1"


# --- reading a stream ----------------------------------------------------------------------------


def _chunk(text: str) -> bytes:
    return (
        b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}) + b"\n\n"
    )


USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}\n\n'
ROLE = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("reads", "end_s", "expected"),
    [
        pytest.param(
            [(ROLE, 0.01), (_chunk("a"), 0.05), (_chunk(" b") + _chunk(" c"), 0.09),
             (USAGE + DONE, 0.10)],
            0.11, (0.05, 3, 3, None, 0.03), id="whole-stream",
        ),
        pytest.param(
            [(_chunk("a")[:9], 0.02), (_chunk("a")[9:], 0.04), (_chunk("b") + DONE, 0.06)],
            0.06, (0.04, 2, None, None, 0.02), id="event-split-across-reads-no-usage",
        ),
        pytest.param(
            [(_chunk("a"), 0.02), (b'data: {"error": {"message": "replica died"}}\n\n', 0.03)],
            0.03, (0.02, 1, None, "stream error: replica died", None), id="error-event",
        ),
        pytest.param(
            [(_chunk("a"), 0.02), (_chunk("b"), 0.03)],
            0.03, (0.02, 2, None, "without data: [DONE]", None), id="cut-short",
        ),
        pytest.param(
            [(b"data: {not json\n\n" + DONE, 0.02)],
            0.02, (None, 0, None, "not JSON", None), id="garbage",
        ),
    ],
)  # fmt: skip
def test_stream_reader_times_and_checks_a_stream(
    helper: ModuleType,
    reads: list[tuple[bytes, float]],
    end_s: float,
    expected: tuple[float | None, int, int | None, str | None, float | None],
) -> None:
    ttft_s, chunks, tokens, error, tpot_s = expected
    reader = helper.StreamReader()
    for data, at_s in reads:
        reader.feed(data, at_s)
    timing = reader.finish(end_s)
    assert timing.e2e_s == end_s
    assert timing.ttft_s == ttft_s
    assert timing.content_chunks == chunks
    assert timing.output_tokens == tokens
    assert timing.received_bytes == sum(len(data) for data, _ in reads)
    if error is None:
        assert timing.error is None
        assert timing.tpot_s == pytest.approx(tpot_s)
    else:
        assert error in timing.error


def test_whole_body_timing(helper: ModuleType) -> None:
    body = orjson.dumps({"choices": [{"text": "hi"}], "usage": {"completion_tokens": 2}})
    timing = helper.whole_body_timing(body, 0.5)
    assert (timing.error, timing.output_tokens, timing.ttft_s, timing.e2e_s) == (None, 2, None, 0.5)
    assert "not JSON" in helper.whole_body_timing(b"<html>", 0.1).error
    assert "no choices" in helper.whole_body_timing(b'{"error": "x"}', 0.1).error


# --- the locustfile itself -----------------------------------------------------------------------


def test_locustfile_imports_only_names_that_exist(helper: ModuleType) -> None:
    tree = ast.parse((EXAMPLES / "locustfile.py").read_text(), "locustfile.py")
    imported: list[tuple[str, str]] = [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module is not None
        for alias in node.names
    ]
    ours = [(m, n) for m, n in imported if m == "locust_requests" or m.startswith("fleetserve")]
    assert ("locust_requests", "build_workload") in ours
    for module, name in ours:
        source = helper if module == "locust_requests" else importlib.import_module(module)
        assert hasattr(source, name), f"locustfile imports {name} from {module}: not there"
