"""benchmarks/tenancy_limits.py at its smallest settings (`--quick`), as a process against
the real Redis, so that the benchmark cannot rot unnoticed: every check it prints passes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.redis_support import require_redis

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_passes_every_check(tmp_path: Path) -> None:
    asyncio.run(require_redis())
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.tenancy_limits", "--quick", "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=140, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-4000:]
    for heading in ("rpm=10", "tpm=6,000", "max_concurrent=3", "SIGKILL of gateway 2", "2. budget"):
        assert heading in out
    assert "FAIL" not in out
    assert out.count("PASS") >= 12
    assert "all checks passed" in out
