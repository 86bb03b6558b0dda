"""Building the gateway's settings from flags, environment, fleet file and defaults, in that
order, and wording what is wrong with a bad value in one line."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    SecretStr,
    ValidationError,
)
from pydantic_settings import (
    SettingsError,
)

from fleetserve.config.settings import (
    ADMIN_KEY_FIELDS,
    ENV_PREFIX,
    GatewaySettings,
    _lower,
)
from fleetserve.errors import ConfigError


def gateway_settings(
    given: Mapping[str, Any], flags: Mapping[str, str] | None = None
) -> GatewaySettings:
    """GatewaySettings from, highest first: `given` (the options a user gave on the command
    line, by field name), the environment, the fleet file's `gateway:` section, the defaults.

    `flags` names each given field's option (`port` -> `--port`) for the error messages. The
    admin key and its file are one setting: the highest source that gives either wins. A bad
    value is a ConfigError of one line naming where it came from, the value and what is allowed.
    """
    flags = flags or {}
    init = dict(given)
    in_given = [name for name in ADMIN_KEY_FIELDS if init.get(name) is not None]
    if len(in_given) == 2:
        key, key_file = (flags.get(name, _flag(name)) for name in ADMIN_KEY_FIELDS)
        raise ConfigError(f"give {key} or {key_file}, not both")
    if in_given:
        init.update({name: init.get(name) for name in ADMIN_KEY_FIELDS})  # the other: None
    else:
        env = _environ()
        in_env = [ENV_PREFIX + name.upper() for name in ADMIN_KEY_FIELDS]
        if all(name in env for name in in_env):
            raise ConfigError(f"set {in_env[0]} or {in_env[1]}, not both")
    try:
        settings = GatewaySettings(**init)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, init, flags)) from exc
    except SettingsError as exc:  # a nested setting in the environment that is not JSON
        raise ConfigError(_explain_settings_error(exc)) from exc
    if settings.admin_key is None and settings.admin_key_file is not None:
        origin = _origin(("admin_key_file",), init, flags)
        key = read_admin_key_file(settings.admin_key_file, origin)
        settings = settings.model_copy(update={"admin_key": SecretStr(key)})
    return settings


def read_admin_key_file(path: Path, origin: str) -> str:
    """The key in `path`, less one trailing newline; `origin` says who named the file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the admin key file {path} ({origin}): {exc.strerror or exc}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the admin key file {path} ({origin}) is not text") from exc
    key = text.removesuffix("\n").removesuffix("\r")
    if not key.strip():
        raise ConfigError(f"the admin key file {path} ({origin}) is empty")
    return key


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def admin_api_line(settings: GatewaySettings) -> str:
    """The start-up banner's line about the admin API; ConfigError when the gateway would
    bind an address others can reach with its admin API (drain included) open."""
    if settings.admin_key is not None:
        return "admin API: key required"
    if is_loopback(settings.host):
        return (
            "admin API: open on loopback (no admin key); set --admin-key or "
            "FLEETSERVE_ADMIN_KEY to require one"
        )
    raise ConfigError(
        f"the gateway would bind {settings.host or 'every address'}, which is not loopback, "
        f"with no admin key, leaving /admin/* (drain included) open to anyone who can reach "
        f"it; set --admin-key-file FILE, --admin-key KEY or FLEETSERVE_ADMIN_KEY "
        f"(or bind 127.0.0.1)"
    )


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _environ() -> dict[str, str]:
    """The environment with upper-case names, as pydantic-settings matches them."""
    return {name.upper(): value for name, value in os.environ.items()}


def _origin(loc: tuple[str | int, ...], given: Mapping[str, Any], flags: Mapping[str, str]) -> str:
    """Where the value at `loc` came from, named as the user gave it."""
    field = str(loc[0])
    if given.get(field) is not None:
        return flags.get(field, _flag(field))
    env = _environ()
    parts = [str(part).upper() for part in loc]
    for end in range(len(parts), 0, -1):
        name = ENV_PREFIX + "__".join(parts[:end])
        if name in env:
            return name
    dotted = ".".join(str(part) for part in loc)
    path = given.get("fleet_file") or env.get(ENV_PREFIX + "FLEET_FILE")
    return f"gateway.{dotted} in fleet file {path}" if path else f"setting {dotted}"


def _explain(exc: ValidationError, given: Mapping[str, Any], flags: Mapping[str, str]) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        loc = error["loc"] or ("value",)
        where = _origin(loc, given, flags)
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown setting {where}")
            continue
        value = error.get("input")
        shown = "(hidden)" if loc[0] == "admin_key" else repr(value)[:60]
        problems.append(f"invalid {where}: {shown} ({_lower(error['msg'])})")
    return "; ".join(problems)


def _explain_settings_error(exc: SettingsError) -> str:
    text = str(exc)
    field = text.split('field "', 1)[1].split('"', 1)[0] if 'field "' in text else None
    if field is None:
        return f"invalid settings in the environment: {text}"
    name = ENV_PREFIX + field.upper()
    return (
        f"invalid {name}: not a JSON object (or set one field at a time, as {name}__<FIELD>=value)"
    )
