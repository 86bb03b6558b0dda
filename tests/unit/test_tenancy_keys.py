"""API keys: their format, parsing, digests under a pepper, and the pepper file."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from fleetserve.config import default_state_dir
from fleetserve.errors import ConfigError
from fleetserve.tenancy.keys import (
    PEPPER_FILE,
    ParsedKey,
    digest,
    load_pepper,
    matches,
    new_key,
    parse_bearer,
    parse_key,
)

PEPPER = b"p" * 32
KEY_RE = re.compile(r"^fs-[A-Za-z0-9]{8}-[A-Za-z0-9_-]{43}$")


def test_new_keys_have_the_documented_form_and_are_distinct() -> None:
    keys = [new_key(PEPPER) for _ in range(200)]
    assert all(KEY_RE.match(k.token) for k in keys)
    assert len({k.token for k in keys}) == 200
    assert len({k.prefix for k in keys}) == 200  # 62**8 prefixes: a clash here is a bug
    for key in keys:
        assert key.token.startswith(f"fs-{key.prefix}-")
        assert key.digest == digest(PEPPER, key.token)
        assert key.token not in repr(key)  # never in a log line by accident


def test_a_key_matches_only_its_own_digest_under_its_own_pepper() -> None:
    key = new_key(PEPPER)
    parsed = parse_key(key.token)
    assert parsed == ParsedKey(key.prefix, key.token)
    assert matches(PEPPER, parsed, key.digest)
    assert not matches(b"q" * 32, parsed, key.digest)
    other = new_key(PEPPER)
    assert not matches(PEPPER, parsed, other.digest)
    tampered = parse_key(key.token[:-1] + ("A" if key.token[-1] != "A" else "B"))
    assert tampered is not None
    assert not matches(PEPPER, tampered, key.digest)


GOOD = "fs-Ab3dEf9h-" + "x" * 43


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        pytest.param(f"Bearer {GOOD}", True, id="bearer"),
        pytest.param(f"bearer   {GOOD}  ", True, id="case-and-spaces"),
        pytest.param(None, False, id="missing"),
        pytest.param("", False, id="empty"),
        pytest.param(GOOD, False, id="no-scheme"),
        pytest.param(f"Basic {GOOD}", False, id="other-scheme"),
        pytest.param("Bearer sk-" + "x" * 48, False, id="openai-style-key"),
        pytest.param("Bearer fs-Ab3dEf9h-" + "x" * 31, False, id="secret-too-short"),
        pytest.param("Bearer fs-Ab3dEf9-" + "x" * 44, False, id="prefix-too-short"),
        pytest.param("Bearer fs-Ab3dEf9!-" + "x" * 43, False, id="prefix-not-alphanumeric"),
        pytest.param("Bearer fs-Ab3dEf9h_" + "x" * 43, False, id="no-dash-after-prefix"),
        pytest.param("Bearer fs-Ab3dEf9h-" + "x" * 42 + "é", False, id="not-url-safe"),
        pytest.param("Bearer fs-Ab3dEf9h-" + "x" * 40 + "' OR 1=1", False, id="sql-shaped"),
    ],
)
def test_bearer_headers(header: str | None, ok: bool) -> None:
    parsed = parse_bearer(header)
    assert (parsed is not None) is ok
    if parsed is not None:
        assert parsed.prefix == "Ab3dEf9h"


def test_the_pepper_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_pepper(state)
    assert len(first) == 32
    assert (state / PEPPER_FILE).stat().st_mode & 0o777 == 0o600
    assert load_pepper(state) == first
    assert load_pepper(state, from_env="from-the-environment") == b"from-the-environment"


def test_a_pepper_others_can_read_is_refused(tmp_path: Path) -> None:
    load_pepper(tmp_path)
    os.chmod(tmp_path / PEPPER_FILE, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_pepper(tmp_path)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({"FLEETSERVE_STATE_DIR": "/srv/fs"}, Path("/srv/fs"), id="explicit"),
        pytest.param({"XDG_DATA_HOME": "/data"}, Path("/data/fleetserve"), id="xdg"),
        pytest.param({}, Path.home() / ".local/share/fleetserve", id="default"),
    ],
)
def test_state_dir(environ: dict[str, str], expected: Path) -> None:
    assert default_state_dir(environ) == expected
