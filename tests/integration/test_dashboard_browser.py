"""The gateway's /dashboard in a real headless chromium (Debian's, driven over CDP):

- three sim replicas behind a gateway with an admin key: the page asks for the key, keeps it
  for the tab, shows the three replicas ready; one replica's process is killed and its row
  turns unhealthy within 2 s; requests show up with their ids; no console errors;
- an autoscaled `fleetserve up` (sim engine, no admin key on loopback: no login): under load
  the fleet scales out and the page's replica count follows the gateway's own within a
  second; no console errors.

Set FLEETSERVE_SCREENSHOT_OUT=docs/dashboard.png to keep the screenshot the second test takes
(`make dashboard-screenshot` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from fleetserve.fleet.processes import free_port
from fleetserve.testing.chromium import CHROMIUM, Chromium
from fleetserve.testing.stack import env_without_settings, fleetserve_argv, services, sim_stack
from tests.integration.test_bench_html import png_size

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

KEY = "browser-admin-key"
MODEL = "sim-dash"
UNHEALTHY_WITHIN_S = 2.0
FOLLOW_WITHIN_S = 1.0
SHOT_W, SHOT_H = 1400, 1250
FLEET = f"""
models:
  - name: {MODEL}
    engine: sim
    autoscale:
      period_s: 0.5
      target_concurrency: 2
      scale_up: {{stabilization_window_s: 0}}
"""


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Chromium]:
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI"):  # CI's `make test` installs it: missing there is a failure
            pytest.fail(f"{CHROMIUM} is missing although `make browser` ran")
        pytest.skip("Debian's chromium is not installed (make browser installs it as root)")
    async with Chromium.launch(tmp_path / "profile") as chromium:
        yield chromium


def rows_in(state: str) -> str:
    return f"document.querySelectorAll('#replicas tr[data-state=\"{state}\"]').length"


def card(attribute: str) -> str:
    return f"document.querySelector('#models .card[data-model=\"{MODEL}\"]')?.dataset.{attribute}"


async def chat(http: aiohttp.ClientSession, url: str, request_id: str, max_tokens: int) -> int:
    body = {
        "model": MODEL, "messages": [{"role": "user", "content": f"{request_id}: tell a story"}],
        "max_tokens": max_tokens, "stream": True,
    }  # fmt: skip
    async with http.post(
        url + "/v1/chat/completions", json=body, headers={"X-Request-ID": request_id}
    ) as response:
        await response.read()
        return response.status


async def ready_replicas(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/admin/fleet") as response:
        ready: int = (await response.json())["ready"]
        return ready


async def test_login_then_a_killed_replica_turns_unhealthy_within_2s(browser: Chromium) -> None:
    with sim_stack(3, model=MODEL, gateway_args=("--admin-key", KEY)) as stack:
        await browser.navigate(stack.url + "/dashboard")
        await browser.wait_for("!document.getElementById('login').hidden")
        assert await browser.evaluate("document.body.dataset.status") == "login"
        await browser.evaluate("document.getElementById('key').focus()")
        await browser.call("Input.insertText", text=KEY)  # typed, as a person would
        await browser.evaluate("document.getElementById('login-form').requestSubmit()")
        await browser.wait_for(f"{rows_in('ready')} === 3")
        assert await browser.evaluate("document.body.dataset.status") == "live"
        assert await browser.evaluate("sessionStorage.getItem('fleetserve.adminKey')") == KEY
        assert await browser.evaluate(card("ready")) == "3"

        victim = stack.replica_id(stack.engines[1])
        row = f"document.querySelector('#replicas tr[data-replica=\"{victim}\"]')"
        stack.engines[1].crash()
        killed = time.monotonic()
        await browser.wait_for(f"{row}?.dataset.state === 'unhealthy'", UNHEALTHY_WITHIN_S)
        assert time.monotonic() - killed < UNHEALTHY_WITHIN_S
        assert await browser.evaluate(f"{rows_in('ready')}") == 2
        await browser.wait_for(f"{card('ready')} === '2'", 1.0)

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            statuses = [await chat(http, stack.url, f"dash-{i}", 4) for i in range(3)]
        assert statuses == [200, 200, 200]
        await browser.wait_for("!!document.querySelector('#requests tr[data-request=\"dash-2\"]')")

        # A reload keeps the key for the tab: no second login.
        await browser.navigate(stack.url + "/dashboard")
        await browser.wait_for("document.body.dataset.status === 'live'")
        assert await browser.evaluate("document.getElementById('login').hidden") is True
    assert browser.console_errors == []


@contextlib.contextmanager
def autoscaled_up(tmp_path: Path) -> Iterator[str]:
    """`fleetserve up --engine sim --replicas 1:3` with a fast policy; its gateway URL."""
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET)
    port = free_port()
    argv = fleetserve_argv(
        "up", "--engine", "sim", "--model", MODEL, "--replicas", "1:3", "--fleet-file", str(fleet),
        "--profile", "a10g", "--cold-start-s", "0.5", "--drain-grace-s", "2", "--port", str(port),
    )  # fmt: skip
    with services() as started:
        up = started.start("up", argv, port, env_without_settings())
        up.wait_ok("/ready", 60.0)
        # `up` prints the page's address beside the endpoint once the port accepts.
        deadline = time.monotonic() + 10.0
        while f"live dashboard: {up.url}/dashboard" not in up.process.log_text():
            assert time.monotonic() < deadline, up.process.log_text()
            time.sleep(0.05)
        assert f"OpenAI-compatible endpoint {up.url}/v1" in up.process.log_text()
        yield up.url


async def test_the_page_follows_an_autoscaled_fleet(browser: Chromium, tmp_path: Path) -> None:
    with autoscaled_up(tmp_path) as url:
        await browser.navigate(url + "/dashboard")
        await browser.wait_for("document.body.dataset.status === 'live'")
        assert await browser.evaluate("document.getElementById('login').hidden") is True
        await browser.wait_for(f"{card('ready')} === '1' && {card('desired')} === '1'")

        deadline = time.monotonic() + 30.0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:

            async def client(i: int) -> None:
                n = 0
                while time.monotonic() < deadline:
                    await chat(http, url, f"load-{i}-{n}", 48)
                    n += 1

            load = [asyncio.create_task(client(i)) for i in range(8)]
            try:
                seen = 1
                # Each step up the gateway takes, the page shows within 1 s (or the next one:
                # replicas that start together may become ready a moment apart).
                while seen < 3:
                    async with asyncio.timeout(deadline - time.monotonic()):
                        while (ready := await ready_replicas(http, url)) == seen:  # noqa: ASYNC110
                            await asyncio.sleep(0.05)  # (polling another process)
                    changed = time.monotonic()
                    seen = ready
                    await browser.wait_for(f"Number({card('ready')}) >= {ready}", FOLLOW_WITHIN_S)
                    assert time.monotonic() - changed < FOLLOW_WITHIN_S
                assert await browser.evaluate(card("desired")) == "3"
                assert await browser.evaluate(rows_in("ready")) == 3
                # The scaling event is listed with its reason, and the chart has its lines.
                await browser.wait_for(
                    "document.querySelector('[data-decisions] .dir.up') !== null", 2.0
                )
                assert (
                    await browser.evaluate(
                        f"document.querySelectorAll('svg[data-chart=\"{MODEL}\"] path').length"
                    )
                    == 3
                )
                await browser.wait_for("document.querySelectorAll('#requests tr[data-request]')"
                                       ".length >= 10", 2.0)  # fmt: skip
                keep = os.environ.get("FLEETSERVE_SCREENSHOT_OUT")
                if keep:  # for the docs: until every replica has served and been scraped
                    await browser.wait_for(
                        "[...document.querySelectorAll('#replicas tr[data-replica]')].every("
                        "(row) => row.children[7].textContent !== '—')", 10.0,
                    )  # fmt: skip
                shot = tmp_path / "dashboard.png"
                await browser.screenshot(shot, SHOT_W, SHOT_H)
            finally:
                for task in load:
                    task.cancel()
                await asyncio.gather(*load, return_exceptions=True)
    assert png_size(shot) == (SHOT_W, SHOT_H)
    assert 30_000 < shot.stat().st_size < 2_000_000  # a drawn page, not a blank one
    if keep:
        shutil.copyfile(shot, keep)
    assert browser.console_errors == []
