"""Fleet file loading and settings from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetserve.config import GatewaySettings, load_fleet_file
from fleetserve.errors import ConfigError

GOOD = """
models:
  - name: llama
    engine: sim
    picker: prefix_affinity
    max_concurrency: 32
    replicas: [http://127.0.0.1:8001/, http://127.0.0.1:8002]
"""


def test_fleet_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(GOOD)
    fleet = load_fleet_file(path)
    (model,) = fleet.models
    assert model.replicas == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert (model.engine, model.picker, model.max_concurrency) == ("sim", "prefix_affinity", 32)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("models: [", "not valid YAML", id="yaml"),
        pytest.param("models: []", "invalid", id="no-models"),
        pytest.param("models: [{name: a, replicas: [localhost:1]}]", "http://", id="bad-url"),
        pytest.param("models: [{name: a}, {name: a}]", "unique", id="duplicate"),
        pytest.param("models: [{name: a, picker: random}]", "invalid", id="bad-picker"),
        pytest.param("models: [{name: a, typo: 1}]", "invalid", id="unknown-key"),
    ],
)
def test_fleet_file_errors_are_clear(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_fleet_file(path)


def test_missing_fleet_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_fleet_file(tmp_path / "nope.yaml")


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETSERVE_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("FLEETSERVE_TIMEOUTS__FIRST_BYTE_S", "12.5")
    settings = GatewaySettings()
    assert settings.max_attempts == 5
    assert settings.timeouts.first_byte_s == 12.5
