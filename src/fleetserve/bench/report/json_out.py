"""report.json: the report model as JSON, and back (`bench compare` reads it)."""

from __future__ import annotations

from pathlib import Path

import orjson
from pydantic import ValidationError

from fleetserve.bench.report.model import SCHEMA_VERSION, BenchReport
from fleetserve.errors import ConfigError

FILENAME = "report.json"


def to_json(report: BenchReport) -> str:
    return report.model_dump_json(indent=2) + "\n"


def write_json(report: BenchReport, out_dir: Path) -> Path:
    """Write `out_dir/report.json` (creating the folder) and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILENAME
    path.write_text(to_json(report), encoding="utf-8")
    return path


def load_report(path: Path) -> BenchReport:
    """Read a report.json; ConfigError says why a file is not one."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read bench report {path}: {error.strerror or error}") from error
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ConfigError(f"{path} is not JSON: {error}") from error
    if not isinstance(data, dict) or "totals" not in data:
        raise ConfigError(f"{path} is not a fleetserve bench report.json")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"{path} has report schema version {version!r}; this fleetserve reads "
            f"version {SCHEMA_VERSION}"
        )
    try:
        return BenchReport.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{path} is not a valid bench report: {where}: {first['msg']}") from error
