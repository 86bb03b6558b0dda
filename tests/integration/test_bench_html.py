"""bench's report.html in a real browser: headless Debian chromium, with no network, draws
every plot (plotly.js populates the divs with SVG) and logs nothing to the console.

Set FLEETSERVE_SCREENSHOT_OUT=docs/bench-report.png to keep the screenshot it takes.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetserve.bench.report.html import write_html
from fleetserve.bench.report.model import RunConfig
from fleetserve.bench.slo import parse_slos
from fleetserve.bench.stats import summarize
from fleetserve.fleet.processes import stop_process_group
from fleetserve.testing.bench_runs import synthetic_run

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

CHROMIUM = "/usr/bin/chromium"
RUN_TIMEOUT_S = 60.0
PLOTS = 5
WIDTH_PX, HEIGHT_PX = 1400, 2400


@dataclass(frozen=True)
class Page:
    dom: str
    console: list[str]  # chromium's CONSOLE log lines: every console message and JS error


def chromium(tmp_path: Path, page: Path, *extra: str) -> Page:
    """Open `page` headless, offline, with a fresh profile; bounded in time, killed by PID."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):  # CI's `make test` installs it: missing there is a failure
            pytest.fail(f"{CHROMIUM} is missing although `make browser` ran")
        pytest.skip("Debian's chromium is not installed (make browser installs it as root)")
    argv = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # any network fetch would fail
        "--enable-logging=stderr", "--v=0", *extra, page.as_uri(),
    ]  # fmt: skip
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within {RUN_TIMEOUT_S:g} s")
    finally:
        stop_process_group(process)
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    lines = err.decode(errors="replace").splitlines()
    return Page(out.decode(errors="replace"), [line for line in lines if ":CONSOLE" in line])


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    records, fleet = synthetic_run()
    config = RunConfig(
        url="http://127.0.0.1:8000",
        model="llama-3.1-8b",
        load="open loop, constant, spike 4 -> 16 rps at 20 s for 15 s",
        duration_s=60.0,
        started_at="2025-01-01T12:00:00Z",
        simulated=True,
        simulation_note="Target: fleetserve engine sim, profile a10g.",
    )
    slos = parse_slos("ttft_p95=500ms,tpot=40ms,e2e=6s,itl_p99=50ms")
    report = summarize(records, duration_s=60.0, config=config, fleet=fleet, slos=slos)
    return write_html(report, tmp_path_factory.mktemp("report"))


def test_console_errors_are_caught(tmp_path: Path) -> None:
    """The check below can fail: a page with a script error shows up in the log."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); missing();</script></body></html>")
    page = chromium(tmp_path, bad, "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in page.console), page.console
    assert any('"boom"' in line for line in page.console), page.console


def test_report_renders_every_plot_without_console_errors(
    tmp_path: Path, report_page: Path
) -> None:
    page = chromium(tmp_path, report_page, "--dump-dom")
    assert page.console == []
    assert page.dom.count('class="plot-container plotly"') == PLOTS
    assert page.dom.count('class="main-svg"') >= 2 * PLOTS
    for div in ("plot-latency", "plot-throughput", "plot-tokens", "plot-fleet"):
        start = page.dom.index(f'id="{div}"')
        assert 'class="main-svg"' in page.dom[start : start + 20_000], div
    assert "replicas ready" in page.dom  # the legend of the replica overlay, drawn as SVG text


def test_report_screenshot(tmp_path: Path, report_page: Path) -> None:
    shot = tmp_path / "report.png"
    page = chromium(
        tmp_path,
        report_page,
        "--hide-scrollbars",
        f"--screenshot={shot}",
        f"--window-size={WIDTH_PX},{HEIGHT_PX}",
    )
    assert page.console == []
    assert png_size(shot) == (WIDTH_PX, HEIGHT_PX)
    assert 20_000 < shot.stat().st_size < 1_000_000  # a drawn page, not a blank one
    keep = os.environ.get("FLEETSERVE_SCREENSHOT_OUT")
    if keep:
        shutil.copyfile(shot, keep)
