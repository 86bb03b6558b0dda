"""llama.cpp adapter: launch command, metrics mapping, model checks, binary lookup."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fleetserve.engines.adapter import LaunchSpec
from fleetserve.engines.llamacpp import build
from fleetserve.engines.llamacpp.adapter import LlamaCppAdapter, threads_per_replica
from fleetserve.engines.llamacpp.model import DEFAULT_MODEL_NAME, load_model
from fleetserve.errors import ConfigError, EngineError

FIXTURES = Path(__file__).parent.parent / "fixtures"


def test_metrics_map_to_signals() -> None:
    signals = LlamaCppAdapter().parse_signals((FIXTURES / "llamacpp_metrics.txt").read_text())
    assert (signals.running, signals.waiting, signals.kv_usage_frac) == (6.0, 3.0, None)


def test_metrics_without_the_gauges_are_missing_not_zero() -> None:
    signals = LlamaCppAdapter().parse_signals("llamacpp:prompt_tokens_total 3\n")
    assert (signals.running, signals.waiting) == (None, None)


def test_launch_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv(build.BINARY_ENV, str(binary))
    spec = LaunchSpec("smol", 9001, options={"model_path": "/m.gguf", "threads": "2", "slots": "4"})
    argv = LlamaCppAdapter().launch_command(spec)
    assert argv[0] == str(binary)
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert pairs["--model"] == "/m.gguf"
    assert pairs["--alias"] == "smol"
    assert pairs["--port"] == "9001"
    assert pairs["--threads"] == "2"
    assert pairs["--parallel"] == "4"
    assert pairs["--ctx-size"] == str(4 * 2048)
    assert "--metrics" in argv


@pytest.mark.parametrize(
    ("replicas", "cores", "threads"),
    [
        pytest.param(1, 2, 2, id="one-gets-all"),
        pytest.param(2, 2, 1, id="split"),
        pytest.param(4, 2, 1, id="at-least-one"),
        pytest.param(3, 16, 5, id="floor"),
    ],
)
def test_threads_per_replica(replicas: int, cores: int, threads: int) -> None:
    assert threads_per_replica(replicas, cores) == threads


def test_missing_binary_says_how_to_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(build.BINARY_ENV, str(tmp_path / "nope"))
    with pytest.raises(EngineError, match="make up"):
        build.find_llama_server()


def test_cache_path_is_keyed_by_version_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/c")
    path = build.cached_binary()
    assert path.parts[:4] == ("/", "c", "fleetserve", "llama-server")
    assert path.parent.name.startswith(build.LLAMA_CPP_PYTHON_VERSION + "-")


def test_packaged_model_is_found_and_is_gguf() -> None:
    model = load_model(None)
    assert model.name == DEFAULT_MODEL_NAME
    assert model.path.name.endswith(".gguf")
    assert model.size_bytes > 50 * 2**20


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, "does not exist", id="missing"),
        pytest.param(b"PK\x03\x04zip", "not a GGUF file", id="not-gguf"),
    ],
)
def test_bad_model_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "m.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_model(path)


def test_any_gguf_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "tiny-model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    assert load_model(path).name == "tiny-model"


def test_build_names_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached: a build is needed
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    with pytest.raises(EngineError) as info:
        build.ensure_llama_server(lambda _line: None)
    message = str(info.value)
    assert "a C++ compiler" in message
    assert "cmake" in message
    assert "ninja" in message


def test_cached_build_is_reused_without_building(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = build.cached_binary()
    cached.parent.mkdir(parents=True)
    cached.write_text("#!/bin/sh\n")
    said: list[str] = []
    assert build.ensure_llama_server(said.append) == cached
    assert said == []
