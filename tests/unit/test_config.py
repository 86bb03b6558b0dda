"""Fleet file loading, and settings from flags, the environment and the fleet file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleetserve.bench.client import ClientSettings
from fleetserve.config import (
    DRAIN_GRACE_S,
    IDLE_TIMEOUT_S,
    READY_TIMEOUT_S,
    GatewaySettings,
    TimeoutSettings,
    admin_api_line,
    gateway_settings,
    is_loopback,
    load_fleet_file,
)
from fleetserve.errors import ConfigError
from fleetserve.fleet.local import LocalActuatorSettings

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


def test_fleet_file_errors_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("models: [{name: a, picker: random, replicas: [localhost:1]}]")
    with pytest.raises(ConfigError) as caught:
        load_fleet_file(path)
    assert "models.0.picker" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETSERVE_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("FLEETSERVE_TIMEOUTS__FIRST_BYTE_S", "12.5")
    settings = GatewaySettings()
    assert settings.max_attempts == 5
    assert settings.timeouts.first_byte_s == 12.5


# -- the order of the settings' sources: flag > environment > fleet file > default ------------

FLEET_WITH_GATEWAY = """
models: [{name: m, replicas: ["http://127.0.0.1:1"]}]
gateway:
  port: 9100
  load_window_s: 9
  timeouts: {first_byte_s: 120}
"""


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No FLEETSERVE_* variable of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith("FLEETSERVE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def fleet_file(tmp_path: Path, text: str = FLEET_WITH_GATEWAY) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def test_fleet_file_gateway_section_is_below_environment_and_flags(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    path = fleet_file(tmp_path)
    settings = gateway_settings({"fleet_file": path})
    assert (settings.port, settings.load_window_s, settings.timeouts.first_byte_s) == (
        9100, 9.0, 120.0)  # fmt: skip
    assert settings.timeouts.idle_s == IDLE_TIMEOUT_S  # the rest of a nested section: defaults
    clean_env.setenv("FLEETSERVE_PORT", "9200")
    clean_env.setenv("FLEETSERVE_TIMEOUTS__IDLE_S", "5")
    settings = gateway_settings({"fleet_file": path})
    assert (settings.port, settings.load_window_s) == (9200, 9.0)  # env over the fleet file
    assert (settings.timeouts.first_byte_s, settings.timeouts.idle_s) == (120.0, 5.0)  # merged
    assert gateway_settings({"fleet_file": path, "port": 9300}).port == 9300  # flag over env


def test_the_fleet_file_can_be_named_by_the_environment(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("FLEETSERVE_FLEET_FILE", str(fleet_file(tmp_path)))
    assert gateway_settings({}).port == 9100
    assert GatewaySettings().port == 9100  # the source is the settings' own


def test_defaults_without_any_source(clean_env: pytest.MonkeyPatch) -> None:
    settings = gateway_settings({})
    assert (settings.port, settings.host, settings.admin_key) == (8000, "127.0.0.1", None)


@pytest.mark.parametrize(
    ("given", "env", "gateway_section", "expected"),
    [
        pytest.param({"port": 70000}, {}, None,
                     "invalid --port: 70000 (input should be less than or equal to 65535)",
                     id="flag"),
        pytest.param({"workers": 0}, {}, None,
                     "invalid --workers: 0 (input should be greater than or equal to 1)",
                     id="flag-workers"),
        pytest.param({}, {"FLEETSERVE_TIMEOUTS__FIRST_BYTE_S": "abc"}, None,
                     "invalid FLEETSERVE_TIMEOUTS__FIRST_BYTE_S: 'abc' (input should be a valid "
                     "number", id="nested-env"),
        pytest.param({}, {"FLEETSERVE_TIMEOUTS": "{bad"}, None,
                     "invalid FLEETSERVE_TIMEOUTS: not a JSON object", id="env-not-json"),
        pytest.param({}, {"FLEETSERVE_PORT": "x"}, "{port: 9000}",
                     "invalid FLEETSERVE_PORT: 'x'", id="env-over-fleet-file"),
        pytest.param({}, {}, "{timeouts: {first_byte_s: -1}}",
                     "invalid gateway.timeouts.first_byte_s in fleet file ", id="fleet-file"),
        pytest.param({}, {}, "{timeouts: {firstbyte_s: 1}}",
                     "unknown setting gateway.timeouts.firstbyte_s in fleet file ",
                     id="fleet-file-typo-nested"),
        pytest.param({}, {}, "{prot: 1}", "unknown gateway setting(s) prot",
                     id="fleet-file-typo"),
        pytest.param({"admin_key": " "}, {}, None,
                     "invalid --admin-key: (hidden) (the admin key must not be empty)",
                     id="empty-key-hidden"),
    ],
)  # fmt: skip
def test_a_bad_value_is_one_line_naming_where_it_came_from(
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
    given: dict[str, object],
    env: dict[str, str],
    gateway_section: str | None,
    expected: str,
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    if gateway_section is not None:
        text = f"models: [{{name: m}}]\ngateway: {gateway_section}\n"
        given = {**given, "fleet_file": fleet_file(tmp_path, text)}
    with pytest.raises(ConfigError) as caught:
        gateway_settings(given, {"port": "--port", "workers": "--workers"})
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


# -- the admin key ------------------------------------------------------------------------


def test_admin_key_never_shows_in_repr_or_dump(clean_env: pytest.MonkeyPatch) -> None:
    settings = gateway_settings({"admin_key": "sk-very-secret"})
    assert settings.admin_key_value() == "sk-very-secret"
    assert "sk-very-secret" not in repr(settings)
    assert "sk-very-secret" not in str(settings.model_dump(mode="json"))


@pytest.mark.parametrize(
    ("content", "key"),
    [
        pytest.param("sk-file\n", "sk-file", id="one-newline-stripped"),
        pytest.param("sk-file\r\n", "sk-file", id="crlf"),
        pytest.param("sk-file", "sk-file", id="no-newline"),
        pytest.param("sk-file\n\n", "sk-file\n", id="only-one-newline"),
    ],
)
def test_admin_key_file(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, content: str, key: str
) -> None:
    path = tmp_path / "key"
    path.write_text(content)
    assert gateway_settings({"admin_key_file": path}).admin_key_value() == key
    clean_env.setenv("FLEETSERVE_ADMIN_KEY_FILE", str(path))
    assert gateway_settings({}).admin_key_value() == key


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, "cannot read the admin key file", id="missing"),
        pytest.param("\n", "is empty", id="empty"),
    ],
)
def test_admin_key_file_problems_are_one_line(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, content: str | None, message: str
) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as caught:
        gateway_settings({"admin_key_file": path}, {"admin_key_file": "--admin-key-file"})
    assert "(--admin-key-file)" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_highest_source_of_the_admin_key_wins(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "key"
    path.write_text("sk-from-file\n")
    text = "models: [{name: m}]\ngateway: {admin_key: sk-from-fleet-file}\n"
    fleet = fleet_file(tmp_path, text)
    assert gateway_settings({"fleet_file": fleet}).admin_key_value() == "sk-from-fleet-file"
    clean_env.setenv("FLEETSERVE_ADMIN_KEY_FILE", str(path))
    assert gateway_settings({"fleet_file": fleet}).admin_key_value() == "sk-from-file"
    given = {"fleet_file": fleet, "admin_key": "sk-from-flag"}
    assert gateway_settings(given).admin_key_value() == "sk-from-flag"
    clean_env.setenv("FLEETSERVE_ADMIN_KEY", "sk-env")
    with pytest.raises(ConfigError, match="FLEETSERVE_ADMIN_KEY or FLEETSERVE_ADMIN_KEY_FILE"):
        gateway_settings({})
    with pytest.raises(ConfigError, match="not both"):
        gateway_settings({"admin_key": "a", "admin_key_file": path})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        pytest.param("127.0.0.1", True, id="ipv4-loopback"),
        pytest.param("127.3.2.1", True, id="ipv4-loopback-net"),
        pytest.param("::1", True, id="ipv6-loopback"),
        pytest.param("localhost", True, id="localhost"),
        pytest.param("0.0.0.0", False, id="all-ipv4"),
        pytest.param("::", False, id="all-ipv6"),
        pytest.param("", False, id="empty-is-all"),
        pytest.param("10.0.0.5", False, id="private"),
        pytest.param("gateway.example", False, id="a-name"),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_admin_api_open_only_on_loopback(clean_env: pytest.MonkeyPatch) -> None:
    assert admin_api_line(gateway_settings({})).startswith("admin API: open on loopback")
    with pytest.raises(ConfigError, match="--admin-key-file FILE, --admin-key KEY or FLEETSERV"):
        admin_api_line(gateway_settings({"host": "0.0.0.0"}))
    keyed = gateway_settings({"host": "0.0.0.0", "admin_key": "k"})
    assert admin_api_line(keyed) == "admin API: key required"


def test_repeated_defaults_have_one_home() -> None:
    assert TimeoutSettings().idle_s == IDLE_TIMEOUT_S == ClientSettings("http://x").idle_timeout_s
    settings = LocalActuatorSettings(model="m", log_dir=Path("/tmp"))
    assert (settings.ready_timeout_s, settings.drain_grace_s) == (READY_TIMEOUT_S, DRAIN_GRACE_S)
