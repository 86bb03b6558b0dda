"""Shared benchmark plumbing: pinned processes, free ports, wrk, open-loop load.

Every process is a `fleetserve.testing.processes.ManagedProcess` (own session, so its whole
group is stopped by PID; `wait_ready` for its readiness), pinned with `taskset`, and stopped
by `Processes` on exit, on an error or on Ctrl-C. Every load run is bounded in count and in
time. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import aiohttp
import orjson
import psutil
import uvloop

from fleetserve.fleet.processes import free_port, stop_process_group
from fleetserve.protocol.sse import SseDecoder, chunk_has_content
from fleetserve.telemetry.quantiles import percentile_of
from fleetserve.testing.processes import ManagedProcess

LOCALHOST = "127.0.0.1"
STOP_GRACE_S = 10.0


# --- processes ---------------------------------------------------------------------------


class Processes:
    """Starts pinned processes and stops all of them (reverse order) when the block ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[ManagedProcess] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        core: int | None,
        env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        """Start `argv` pinned to `core` (taskset execs the command, so the PID and the group
        are the server itself); wait for it with `proc.wait_ready(url, timeout_s)`."""
        pinned = ["taskset", "-c", str(core), *argv] if core is not None else list(argv)
        proc = ManagedProcess(
            pinned,
            log_path=self.log_dir / f"{name}.log",
            env={**os.environ, **env} if env else None,
            stop_timeout_s=STOP_GRACE_S,
            name=name,
        )
        proc.start()
        self._procs.append(proc)
        return proc

    def stop(self, proc: ManagedProcess) -> None:
        proc.stop()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        while self._procs:
            self.stop(self._procs[-1])


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so that `finally` blocks stop what was started."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def pin_self(core: int) -> None:
    """Pin this process (the load generator and orchestrator) to `core`."""
    os.sched_setaffinity(0, {core})


# --- loopback round trip (the machine's own floor) ------------------------------------------

_ECHO_SERVER = """
import socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(4096):
        conn.sendall(data)
    conn.close()
"""


@dataclass(frozen=True, slots=True)
class RoundTrip:
    p50_us: float
    p99_us: float


def loopback_round_trip(
    procs: Processes, python: str, server_core: int, rounds: int, gap_s: float = 0.002
) -> RoundTrip:
    """TCP ping-pong of 200 bytes from this process to an echo server pinned on `server_core`.

    The gap lets both cores go idle between rounds, as they do between requests at a fixed
    rate; what one hop between two processes costs here bounds any added latency from below.
    """
    port = free_port()
    name = f"echo-core{server_core}"
    proc = procs.start(name, [python, "-c", _ECHO_SERVER, str(port)], server_core)
    try:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                conn = socket.create_connection((LOCALHOST, port), timeout=2.0)
                break
            except OSError:
                if time.monotonic() > deadline or not proc.running:
                    raise RuntimeError(f"{name} did not start:\n{proc.log_text()}") from None
                time.sleep(0.02)
        samples = []
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            payload = b"x" * 200
            for _ in range(rounds):
                t0 = time.perf_counter()
                conn.sendall(payload)
                got = 0
                while got < len(payload):
                    chunk = conn.recv(4096)
                    if not chunk:
                        raise RuntimeError(f"{name} closed the connection")
                    got += len(chunk)
                samples.append(time.perf_counter() - t0)
                time.sleep(gap_s)
    finally:
        procs.stop(proc)
    p50, p99 = percentile_of(samples, 50), percentile_of(samples, 99)
    if p50 is None or p99 is None:
        raise RuntimeError(f"no round trips to {name}")
    return RoundTrip(p50 * 1e6, p99 * 1e6)


# --- CPU accounting ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpuUsage:
    core_busy_pct: tuple[float, ...]  # per core, over the window
    process_pct: dict[str, float]  # per named process; 100 = one core


class CpuWindow:
    """Core busy% and per-process CPU% between `start()` and `stop()`."""

    def __init__(self, procs: Sequence[ManagedProcess]) -> None:
        self._procs = {p.name: psutil.Process(p.pid) for p in procs}
        self._t0 = 0.0
        self._cores0: list[tuple[float, float]] = []
        self._proc0: dict[str, float] = {}

    @staticmethod
    def _cores() -> list[tuple[float, float]]:
        out = []
        for t in psutil.cpu_times(percpu=True):
            idle = t.idle + getattr(t, "iowait", 0.0)
            out.append((idle, sum(t)))
        return out

    def _proc_times(self) -> dict[str, float]:
        times = {}
        for name, proc in self._procs.items():
            with contextlib.suppress(psutil.Error):
                cpu = proc.cpu_times()
                times[name] = cpu.user + cpu.system
        return times

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cores0 = self._cores()
        self._proc0 = self._proc_times()

    def stop(self) -> CpuUsage:
        wall = max(time.monotonic() - self._t0, 1e-9)
        busy = []
        for (idle0, total0), (idle1, total1) in zip(self._cores0, self._cores(), strict=True):
            total = max(total1 - total0, 1e-9)
            busy.append(100.0 * (1.0 - (idle1 - idle0) / total))
        proc1 = self._proc_times()
        pct = {n: 100.0 * (proc1[n] - t0) / wall for n, t0 in self._proc0.items() if n in proc1}
        return CpuUsage(tuple(busy), pct)


# --- wrk (closed loop, max throughput) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    non_2xx: int
    socket_errors: int
    raw: str


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(raw: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", raw)
    total = re.search(r"(\d+) requests in", raw)
    if rps is None or total is None:
        raise RuntimeError(f"cannot read wrk output:\n{raw}")
    pcts = dict(re.findall(r"^\s+(50|99)\.000%\s+(\S+)$", raw, re.MULTILINE))
    pcts |= dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", raw, re.MULTILINE))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", raw)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", raw)
    return WrkResult(
        requests=int(total.group(1)),
        rps=float(rps.group(1)),
        p50_ms=_wrk_ms(pcts["50"]) if "50" in pcts else None,
        p99_ms=_wrk_ms(pcts["99"]) if "99" in pcts else None,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
        raw=raw,
    )


def wrk_post_script(path: Path, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> Path:
    """A wrk lua script that POSTs `body` as JSON on every request (with `headers`)."""
    lua_body = body.decode().replace("\\", "\\\\").replace("'", "\\'")
    extra = "".join(f'wrk.headers["{name}"] = "{value}"\n' for name, value in headers)
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"{extra}wrk.body = '{lua_body}'\n"
    )
    return path


def run_wrk(
    url: str,
    script: Path,
    duration_s: float,
    connections: int,
    core: int | None,
    threads: int = 1,
) -> WrkResult:
    """One closed-loop wrk run, pinned to `core`; killed if it outlives its duration."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `make bench-tools` (Debian's wrk)")
    seconds = max(1, round(duration_s))
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    argv += ["--timeout", "5s", "-s", str(script), url]
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    popen = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = popen.communicate(timeout=seconds + 15)
    finally:
        stop_process_group(popen, grace_s=2.0)
    if popen.returncode != 0:
        raise RuntimeError(f"wrk failed ({popen.returncode}):\n{out.decode(errors='replace')}")
    return parse_wrk(out.decode(errors="replace"))


# --- open loop (fixed rate) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenLoopSpec:
    url: str
    body: bytes
    rate_rps: float
    duration_s: float
    stream: bool
    expect_content_chunks: int  # content deltas a valid answer carries (= max_tokens)
    chat: bool = True
    timeout_s: float = 10.0
    max_connections: int = 512
    headers: tuple[tuple[str, str], ...] = ()  # e.g. a tenant's Authorization

    @property
    def count(self) -> int:
        return max(1, round(self.rate_rps * self.duration_s))


@dataclass
class OpenLoopResult:
    spec: OpenLoopSpec
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    e2e_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    send_lag_s: list[float] = field(default_factory=list)
    reads_per_stream: list[int] = field(default_factory=list)  # body reads per valid stream
    send_wall_s: float = 0.0
    cpu: CpuUsage | None = None

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def ms(self, values: Sequence[float], pct: float) -> float | None:
        value = percentile_of(values, pct)
        return None if value is None else value * 1000.0


def merge_results(parts: Sequence[OpenLoopResult]) -> OpenLoopResult:
    """One result from equal-length slices of the same point (CPU usage averaged)."""
    first = parts[0]
    spec = dataclasses.replace(first.spec, duration_s=sum(p.spec.duration_s for p in parts))
    out = OpenLoopResult(spec)
    for part in parts:
        out.sent += part.sent
        out.ok += part.ok
        for kind, n in part.errors.items():
            out.errors[kind] = out.errors.get(kind, 0) + n
        out.e2e_s += part.e2e_s
        out.ttft_s += part.ttft_s
        out.send_lag_s += part.send_lag_s
        out.reads_per_stream += part.reads_per_stream
        out.send_wall_s += part.send_wall_s
    usages = [p.cpu for p in parts if p.cpu is not None]
    if usages:
        cores = tuple(
            statistics.fmean(c) for c in zip(*(u.core_busy_pct for u in usages), strict=True)
        )
        names = set.intersection(*(set(u.process_pct) for u in usages))
        procs = {n: statistics.fmean(u.process_pct[n] for u in usages) for n in names}
        out.cpu = CpuUsage(cores, procs)
    return out


class SseCheck:
    """Counts the content chunks of an OpenAI SSE stream as bytes arrive; notes `[DONE]`.

    Framing and what counts as content are fleetserve's own (`protocol.sse`), as bench's.
    A data field that is not JSON raises ValueError (orjson.JSONDecodeError).
    """

    def __init__(self) -> None:
        self.content_chunks = 0
        self.done = False
        self.after_done = False
        self._events = SseDecoder()

    def feed(self, data: bytes) -> bool:
        """Returns whether `data` completed an event carrying content."""
        saw_content = False
        for payload in self._events.feed(data):
            if self.done:
                self.after_done = True
            elif payload == b"[DONE]":
                self.done = True
            else:
                chunk = orjson.loads(payload)
                if type(chunk) is dict and chunk_has_content(chunk):
                    self.content_chunks += 1
                    saw_content = True
        return saw_content

    @property
    def valid(self) -> bool:
        return self.done and not self.after_done and not self._events.pending


def _content_of(body: bytes, chat: bool) -> str:
    choices = orjson.loads(body).get("choices") or [{}]
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
    return text if isinstance(text, str) else ""


async def _one_request(
    session: aiohttp.ClientSession, spec: OpenLoopSpec, t_sched: float, res: OpenLoopResult
) -> None:
    res.send_lag_s.append(time.perf_counter() - t_sched)
    try:
        async with session.post(spec.url, data=spec.body) as response:
            if not 200 <= response.status < 300:
                await response.read()
                res.error(f"http_{response.status}")
                return
            if not spec.stream:
                data = await response.read()
                t_end = time.perf_counter()
                if not _content_of(data, spec.chat):
                    res.error("bad_body")
                    return
                res.e2e_s.append(t_end - t_sched)
                res.ok += 1
                return
            check = SseCheck()
            ttft: float | None = None
            reads = 0
            async for chunk in response.content.iter_any():
                reads += 1
                if check.feed(chunk) and ttft is None:
                    ttft = time.perf_counter() - t_sched
            t_end = time.perf_counter()
            if not check.valid or ttft is None:
                res.error("bad_stream")
            elif check.content_chunks != spec.expect_content_chunks:
                res.error(f"chunks_{check.content_chunks}")
            else:
                res.ttft_s.append(ttft)
                res.e2e_s.append(t_end - t_sched)
                res.reads_per_stream.append(reads)
                res.ok += 1
    except TimeoutError:
        res.error("timeout")
    except aiohttp.ClientError as exc:
        res.error(f"client_{type(exc).__name__}")
    except ValueError:  # orjson.JSONDecodeError: not an OpenAI answer
        res.error("bad_json")


async def open_loop(spec: OpenLoopSpec) -> OpenLoopResult:
    """Send `spec.count` requests at fixed intended times t0 + i/rate, latency from those.

    A sender that falls behind sends at once and is charged for it (no coordinated omission).
    The run takes at most duration + timeout + 1 s; requests still open then count as errors.
    """
    res = OpenLoopResult(spec)
    interval = 1.0 / spec.rate_rps
    connector = aiohttp.TCPConnector(limit=spec.max_connections)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    headers = {"Content-Type": "application/json", **dict(spec.headers)}
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers, auto_decompress=False
    ) as session:
        tasks: list[asyncio.Task[None]] = []
        t0 = time.perf_counter() + 0.01
        for i in range(spec.count):
            t_sched = t0 + i * interval
            delay = t_sched - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(_one_request(session, spec, t_sched, res)))
        res.sent = len(tasks)
        res.send_wall_s = time.perf_counter() - t0
        _, pending = await asyncio.wait(tasks, timeout=spec.timeout_s + 1.0)
        for task in pending:
            task.cancel()
            res.error("unfinished")
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return res


def run_open_loop(
    spec: OpenLoopSpec, warmup_s: float = 0.0, cpu: CpuWindow | None = None
) -> OpenLoopResult:
    """Warm up at the same rate, then measure on a fresh uvloop with the GC paused.

    `cpu`, when given, covers the measured part only; its usage lands in the result.
    """
    if warmup_s > 0:
        uvloop.run(open_loop(dataclasses.replace(spec, duration_s=warmup_s)))
    gc.collect()
    gc.disable()  # the client's own GC pauses would land in every latency figure
    try:
        if cpu is not None:
            cpu.start()
        res: OpenLoopResult = uvloop.run(open_loop(spec))
        if cpu is not None:
            res.cpu = cpu.stop()
        return res
    finally:
        gc.enable()


# --- machine facts, for the heading of a report ---------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def first_line(argv: Sequence[str]) -> str:
    """First line a command prints (stdout, else stderr), run in the repository, or "?"."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False, cwd=REPO_ROOT
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (done.stdout or done.stderr).splitlines()
    return lines[0].strip() if lines else "?"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "?"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


@dataclass(frozen=True, slots=True)
class Spread:
    """One figure over repeated runs: min, median (None when no run has it) and the values."""

    low: float | None
    median: float | None
    values: list[float]


def spreads(figures: Sequence[Mapping[str, float | None]]) -> dict[str, Spread]:
    """Each figure's spread over runs, in the first run's order."""
    out: dict[str, Spread] = {}
    for name in figures[0]:
        values = [v for f in figures if (v := f[name]) is not None]
        low = min(values) if values else None
        out[name] = Spread(low, statistics.median(values) if values else None, values)
    return out


def chat_body(model: str, stream: bool, max_tokens: int) -> bytes:
    """The overhead benchmarks' request: one short chat turn."""
    return orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    )


def added_ms(off: OpenLoopResult, on: OpenLoopResult, rate: float) -> dict[str, float | None]:
    """What the `on` gateway adds to e2e and TTFT at p50 and p99, ms, at one open-loop rate."""
    out: dict[str, float | None] = {}
    for label, values in (("e2e", "e2e_s"), ("TTFT", "ttft_s")):
        for q in (50, 99):
            x, y = on.ms(getattr(on, values), q), off.ms(getattr(off, values), q)
            out[f"added {label} p{q} ms @{rate:g} rps"] = None if x is None or y is None else x - y
    return out
