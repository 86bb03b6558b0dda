"""API keys: `fs-<prefix>-<secret>`, shown once, stored only as an HMAC under a server pepper.

The prefix (8 alphanumeric characters) is public: it names the key in listings and logs and
is what a lookup goes by. The secret (43 URL-safe characters, 256 random bits) never leaves
the response that created the key: the store keeps HMAC-SHA256(pepper, whole key), so a copy
of the database alone cannot be turned back into keys, nor checked against guesses without
the pepper. Comparisons are constant-time.

The pepper is `FLEETSERVE_KEY_PEPPER` when set, else a random 32 bytes generated once into
`<state dir>/key-pepper` (mode 0600). Losing it invalidates every key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path

from fleetserve.errors import ConfigError

KEY_SCHEME = "fs"
PREFIX_LEN = 8
SECRET_BYTES = 32  # token_urlsafe(32): 43 characters
MIN_SECRET_LEN = 32
PEPPER_FILE = "key-pepper"
PEPPER_BYTES = 32
_ALPHANUMERIC = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A key as a client presented it; `token` is the whole `fs-...` string."""

    prefix: str
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new key: `token` is shown to its owner once; `digest` is what is stored."""

    prefix: str
    token: str = field(repr=False)
    digest: str


def new_key(pepper: bytes) -> IssuedKey:
    prefix = "".join(secrets.choice(_ALPHANUMERIC) for _ in range(PREFIX_LEN))
    token = f"{KEY_SCHEME}-{prefix}-{secrets.token_urlsafe(SECRET_BYTES)}"
    return IssuedKey(prefix, token, digest(pepper, token))


def digest(pepper: bytes, token: str) -> str:
    """HMAC-SHA256 of the whole key under the pepper, hex."""
    return hmac.new(pepper, token.encode("ascii"), hashlib.sha256).hexdigest()


def matches(pepper: bytes, key: ParsedKey, stored_digest: str) -> bool:
    """Whether `key` is the one whose digest was stored (constant time)."""
    return hmac.compare_digest(digest(pepper, key.token), stored_digest)


_KEY_FORM = re.compile(
    rf"{KEY_SCHEME}-([A-Za-z0-9]{{{PREFIX_LEN}}})-[A-Za-z0-9_-]{{{MIN_SECRET_LEN},512}}"
)


def parse_key(token: str) -> ParsedKey | None:
    """`fs-<8 alphanumeric>-<32+ URL-safe>`, or None for anything else."""
    found = _KEY_FORM.fullmatch(token)
    return None if found is None else ParsedKey(found.group(1), token)


def parse_bearer(authorization: str | None) -> ParsedKey | None:
    """The key of an `Authorization: Bearer fs-...` header, or None (missing or malformed)."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return parse_key(credentials.strip())


def load_pepper(state_dir: Path, from_env: str | None = None) -> bytes:
    """The key pepper: `from_env` (FLEETSERVE_KEY_PEPPER) if given, else the state
    directory's, created on first use with mode 0600. ConfigError if it cannot be read or
    written, or if the file is readable by others."""
    if from_env:
        return from_env.encode()
    path = state_dir / PEPPER_FILE
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_pepper(path)
    except OSError as exc:
        raise ConfigError(f"cannot create the key pepper {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_bytes(PEPPER_BYTES))
    return _read_pepper(path)


def _read_pepper(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the key pepper {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise ConfigError(
            f"the key pepper {path} is readable by others (mode {mode & 0o777:o}); "
            f"run: chmod 600 {path}"
        )
    if len(data) < PEPPER_BYTES // 2:
        raise ConfigError(f"the key pepper {path} is too short ({len(data)} bytes)")
    return data
