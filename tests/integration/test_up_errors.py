"""What a user sees when `fleetserve up` cannot start: one clear line, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from fleetserve.errors import EngineError
from fleetserve.fleet.engine_process import EngineProcess, check_memory
from fleetserve.fleet.processes import free_port
from fleetserve.testing.stack import fleetserve_argv

pytestmark = pytest.mark.integration


def run_up(*args: str) -> tuple[int, str]:
    argv = fleetserve_argv("up", "--port", str(free_port()), *args)
    result = subprocess.run(
        argv, capture_output=True, timeout=60, stdin=subprocess.DEVNULL, check=False
    )
    return result.returncode, result.stderr.decode(errors="replace")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(None, "does not exist", id="missing"),
        pytest.param(b"not a model", "is not a GGUF file", id="not-gguf"),
    ],
)
def test_bad_model_file(tmp_path: Path, content: bytes | None, expected: str) -> None:
    model = tmp_path / "model.gguf"
    if content is not None:
        model.write_bytes(content)
    code, stderr = run_up("--model", str(model))
    assert code != 0
    assert "Traceback" not in stderr
    assert expected in stderr


def test_engine_that_exits_at_start_shows_its_log(tmp_path: Path) -> None:
    model = tmp_path / "broken.gguf"
    model.write_bytes(b"GGUF" + b"\xff" * 64)  # GGUF magic, garbage after it
    code, stderr = run_up("--model", str(model), "--replicas", "1")
    assert code != 0
    assert "Traceback" not in stderr
    assert "replica-0 exited with code" in stderr
    assert "last lines of" in stderr


def test_autoscaled_engine_that_exits_at_start_is_one_clear_error(tmp_path: Path) -> None:
    """The floor of an autoscaled fleet starts inside the gateway's lifespan: a failure
    there is the same clear error and a non-zero exit, not uvicorn's traceback."""
    model = tmp_path / "broken.gguf"
    model.write_bytes(b"GGUF" + b"\xff" * 64)
    code, stderr = run_up("--model", str(model), "--replicas", "1:2")
    assert code == 1
    assert "Traceback" not in stderr
    assert "ERROR" not in stderr  # nothing from uvicorn's logger
    assert "exited with code 1 while starting; last lines of its log" in stderr
    assert stderr.count("error:") == 1


def test_not_enough_memory_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    me = EngineProcess("replica-0", "http://127.0.0.1:1", SimpleNamespace(pid=psutil.Process().pid),  # type: ignore[arg-type]
                       Path("/dev/null"))  # fmt: skip
    rss = psutil.Process().memory_info().rss
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=rss * 2))
    check_memory(me, 1)  # one more fits
    with pytest.raises(EngineError, match="not enough memory for 5 replicas"):
        check_memory(me, 4)
