"""Debian's headless chromium driven over the Chrome DevTools Protocol, for page tests.

A page that lives (the gateway's /dashboard streams snapshots) cannot be checked with
`--dump-dom`, which prints the DOM once; this drives a real chromium instead, over CDP's
websocket with aiohttp (already a dependency; no Playwright, no downloaded browser):

    async with Chromium.launch(profile_dir) as browser:
        await browser.navigate(url)
        await browser.wait_for("document.title !== ''")
        assert browser.console_errors == []

Every console error, uncaught exception and error log entry (failed loads included) is kept
in `console_errors`. Chromium runs with a fresh profile, in its own process group, with every
host name mapped to nowhere (only 127.0.0.1 answers), and is stopped by PID.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from fleetserve.fleet.processes import stop_process_group

CHROMIUM = "/usr/bin/chromium"
START_TIMEOUT_S = 20.0
CALL_TIMEOUT_S = 10.0


class BrowserError(RuntimeError):
    """Chromium did not start, a CDP call failed, or a page condition never held."""


class Chromium:
    def __init__(
        self, process: subprocess.Popen[bytes], http: aiohttp.ClientSession, ws: Any
    ) -> None:
        self.process = process
        self._http = http
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self.console_errors: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(
        cls, profile_dir: Path, *, width: int = 1400, height: int = 1000
    ) -> AsyncIterator[Chromium]:
        argv = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--hide-scrollbars",
            f"--window-size={width},{height}", f"--user-data-dir={profile_dir}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            "about:blank",
        ]  # fmt: skip
        # A Popen, not asyncio's process: stop_process_group stops it by PID, whatever happens.
        process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            async with aiohttp.ClientSession() as http:
                ws_url = await _page_socket(process, profile_dir, http)
                ws = await http.ws_connect(ws_url, max_msg_size=64 * 2**20)
                browser = cls(process, http, ws)
                try:
                    for domain in ("Runtime", "Log", "Page"):
                        await browser.call(f"{domain}.enable")
                    yield browser
                finally:
                    await browser.close()
        finally:
            stop_process_group(process)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()

    # -- CDP ---------------------------------------------------------------------------------
    async def _read(self) -> None:
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = message.json()
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            self._event(data.get("method", ""), data.get("params", {}))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(BrowserError("chromium closed the DevTools connection"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console_errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exception = details.get("exception", {})
            self.console_errors.append(
                f"uncaught: {exception.get('description') or details.get('text')}"
            )
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error":
                self.console_errors.append(f"log: {entry.get('text')} {entry.get('url', '')}")
        for future in self._events.pop(method, []):
            if not future.done():
                future.set_result(params)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        try:
            answer = await asyncio.wait_for(future, CALL_TIMEOUT_S)
        except TimeoutError:
            raise BrowserError(f"{method}: no answer within {CALL_TIMEOUT_S:g} s") from None
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    # -- pages -------------------------------------------------------------------------------
    async def navigate(self, url: str) -> None:
        loaded: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._events.setdefault("Page.loadEventFired", []).append(loaded)
        await self.call("Page.navigate", url=url)
        try:
            await asyncio.wait_for(loaded, CALL_TIMEOUT_S)
        except TimeoutError:
            raise BrowserError(f"{url} did not load within {CALL_TIMEOUT_S:g} s") from None

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout_s: float = 10.0, poll_s: float = 0.05) -> Any:
        """Poll until the expression is truthy; its value. BrowserError when it never is."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise BrowserError(f"{expression!r} did not hold within {timeout_s:g} s")
            await asyncio.sleep(poll_s)

    async def screenshot(self, path: Path, width: int, height: int) -> None:
        """A PNG of the page at `width` x `height` CSS pixels."""
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width, height=height, deviceScaleFactor=1, mobile=False,
        )  # fmt: skip
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))


async def _page_socket(
    process: subprocess.Popen[bytes], profile_dir: Path, http: aiohttp.ClientSession
) -> str:
    """The DevTools websocket of chromium's first page: its port is in DevToolsActivePort."""
    port_file = profile_dir / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise BrowserError(f"chromium exited with {process.returncode} while starting")
        if port_file.exists() and (lines := port_file.read_text().split()):
            try:
                async with http.get(f"http://127.0.0.1:{lines[0]}/json/list") as response:
                    targets = await response.json()
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
            except (aiohttp.ClientError, ValueError):
                pass  # not listening yet
        if time.monotonic() >= deadline:
            raise BrowserError(f"chromium's DevTools did not answer within {START_TIMEOUT_S:g} s")
        await asyncio.sleep(0.05)
