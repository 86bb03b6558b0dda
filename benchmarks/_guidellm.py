"""GuideLLM (PyPI `guidellm`) run side by side with fleetserve bench, offline, in its own venv.

GuideLLM pulls in torch and transformers, so it lives in `.venv-guidellm/` at the repository
root (gitignored), created on first use with `python -m venv` and pip. It runs offline
(`HF_HUB_OFFLINE=1`): its prompts come from a JSONL file that fleetserve's own request builder
writes (the same 32-word prompts, `output_tokens_count` 16), so it needs no tokenizer and no
dataset from a hub; token counts come from the server's `usage`.

By default one GuideLLM worker process (`GUIDELLM__MAX_WORKER_PROCESSES=1`; GuideLLM's own
default is 10) and its main process are pinned to the bench core: one process sends, on one
core, as fleetserve bench does (`Placement` changes both).
Every run is bounded (`max_duration`, the dataset's length, and a wall-clock timeout) and its
process group is stopped by PID.
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks._capacity_stats import RunStats, Timing, failed_run, summarize
from fleetserve.bench.workload import Workload
from fleetserve.fleet.processes import stop_process_group

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-guidellm"
REQUIREMENT = "guidellm==0.8.1"
INSTALL_TIMEOUT_S = 1800.0
START_ALLOWANCE_S = 60.0  # GuideLLM's start-up (imports, spawned workers) and JSON writing
TOOL = "guidellm"


@dataclass(frozen=True, slots=True)
class Placement:
    """Where GuideLLM runs: `taskset -c` cores ("" = anywhere) and its worker processes."""

    cores: str
    workers: int = 1


class GuideLLMUnavailableError(Exception):
    """GuideLLM could not be installed or started here; the message says why."""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_guidellm(python: str, venv: Path = VENV) -> Path:
    """The `guidellm` executable, installing it into `venv` first when it is not there."""
    exe = venv / "bin" / "guidellm"
    if not exe.exists():
        print(f"installing {REQUIREMENT} into {venv} (torch and transformers: minutes) ...")
        steps = [
            [python, "-m", "venv", str(venv)],
            [str(venv / "bin" / "pip"), "install", "--quiet", REQUIREMENT],
        ]
        for argv in steps:
            try:
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
                )
            except subprocess.TimeoutExpired:
                raise GuideLLMUnavailableError(
                    f"{' '.join(argv)} did not finish in {INSTALL_TIMEOUT_S:.0f} s"
                ) from None
            if done.returncode != 0:
                raise GuideLLMUnavailableError(
                    f"{' '.join(argv)} failed ({done.returncode}):\n{_tail(done.stderr)}"
                )
    try:
        done = subprocess.run(
            [str(exe), "--version"], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise GuideLLMUnavailableError(f"{exe} --version: {error}") from None
    if done.returncode != 0:
        raise GuideLLMUnavailableError(f"{exe} --version failed:\n{_tail(done.stderr)}")
    return exe


def write_dataset(path: Path, workload: Workload, count: int) -> Path:
    """`count` rows of the prompts fleetserve bench sends, with their output length."""
    with path.open("wb") as out:
        for _ in range(count):
            request = workload.next()
            body = orjson.loads(request.body)
            prompt = body["messages"][-1]["content"]
            out.write(
                orjson.dumps({"prompt": prompt, "output_tokens_count": request.output_tokens})
            )
            out.write(b"\n")
    return path


def _argv(
    exe: Path, url: str, model: str, profile: str, data: Path, out: Path, limit_s: float
) -> list[str]:
    return [
        str(exe), "run",
        "--backend", f"kind=openai_http,target={url},model={model}",
        "--profile", profile,
        "--constraint", f"kind=max_duration,seconds={limit_s:g}",
        "--data", f"kind=json_file,path={data}",
        "--output", f"kind=json,path={out}",
        "--disable-console-interactive",
    ]  # fmt: skip


def _run(argv: Sequence[str], place: Placement, cwd: Path, timeout_s: float) -> tuple[str, float]:
    """Run GuideLLM pinned to its cores; its output and its process tree's CPU seconds."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "GUIDELLM__MAX_WORKER_PROCESSES": str(place.workers),
        "GUIDELLM__LOGGING__LOG_FILE": str(cwd / "guidellm.log"),
    }
    pinned = ["taskset", "-c", place.cores, *argv] if place.cores else list(argv)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    popen = subprocess.Popen(
        pinned, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = popen.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_process_group(popen, grace_s=5.0)
        raise GuideLLMUnavailableError(f"GuideLLM ran past {timeout_s:.0f} s; stopped") from None
    finally:
        stop_process_group(popen, grace_s=5.0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    text = output.decode(errors="replace")
    if popen.returncode != 0:
        raise GuideLLMUnavailableError(f"GuideLLM exited with {popen.returncode}:\n{_tail(text)}")
    return text, cpu_s


def _timings(benchmark: dict[str, Any], closed_loop: bool) -> tuple[list[Timing], int]:
    """Per-request timings, and how many were cut by the run's end (`incomplete`).

    Open loop, a cut request counts as failed (it was due and not answered); closed loop it is
    left out, as fleetserve bench drains its last requests instead of cutting them.
    """
    timings: list[Timing] = []
    cut = len(benchmark["requests"].get("incomplete") or ())
    kinds = {"successful": None, "errored": "error", "incomplete": "incomplete"}
    if closed_loop:
        del kinds["incomplete"]
    for status, kind in kinds.items():
        for request in benchmark["requests"].get(status) or ():
            t = request["info"]["timings"]
            sent = t.get("request_start")
            end = t.get("request_end") or t.get("resolve_end") or sent
            timings.append(Timing(
                intended_s=t.get("targeted_start") or sent or math.nan,
                sent_s=math.nan if sent is None else sent,
                end_s=math.nan if end is None else end,
                error=kind,
            ))  # fmt: skip
    return timings, cut


def _own_report(benchmark: dict[str, Any]) -> str:
    """GuideLLM's own figures: its dispatch delay p99 and successful requests per second."""
    metrics = benchmark.get("metrics") or {}
    delay = (metrics.get("request_dispatch_delay") or {}).get("successful") or {}
    p99 = (delay.get("percentiles") or {}).get("p99")
    totals = metrics.get("request_totals") or {}
    duration = benchmark.get("duration") or math.nan
    rate = (totals.get("successful") or 0) / duration if duration else math.nan
    p99_text = f"{p99 * 1e3:.2f} ms" if isinstance(p99, float) else "n/a"
    return f"own report: dispatch delay p99 {p99_text}, {rate:.0f} ok req/s"


def run_guidellm(
    exe: Path,
    url: str,
    model: str,
    *,
    profile: str,
    asked: float,
    expected: int,
    data: Path,
    limit_s: float,
    place: Placement,
    workdir: Path,
    closed_loop: bool = False,
) -> RunStats:
    """One GuideLLM benchmark (`profile`, e.g. `kind=constant,rate=500`) as RunStats."""
    out = workdir / f"guidellm-{profile.replace(',', '-').replace('=', '')}.json"
    out.unlink(missing_ok=True)
    argv = _argv(exe, url, model, profile, data, out, limit_s)
    started = time.monotonic()
    try:
        output, cpu_s = _run(argv, place, workdir, limit_s + START_ALLOWANCE_S)
        report = orjson.loads(out.read_bytes())
    except GuideLLMUnavailableError as error:
        return failed_run(TOOL, asked, expected, str(error))
    except (OSError, orjson.JSONDecodeError) as error:
        return failed_run(TOOL, asked, expected, f"no GuideLLM report at {out}: {error}")
    finally:
        out.unlink(missing_ok=True)  # tens of MB at high rates
    benchmarks = report.get("benchmarks") or []
    if not benchmarks:
        return failed_run(
            TOOL, asked, expected, f"GuideLLM reported no benchmark:\n{_tail(output)}"
        )
    timings, cut = _timings(benchmarks[0], closed_loop)
    wall_s = time.monotonic() - started
    note = _own_report(benchmarks[0])
    if cut:
        note += f"; {cut} cut by the end of the run"
    codes = [str(w.get("code")) for w in benchmarks[0].get("warnings") or () if isinstance(w, dict)]
    if codes:
        note += f"; its warnings: {', '.join(codes)}"
    note += f"; its CPU {cpu_s:.1f} s in {wall_s:.0f} s incl. start-up"
    return summarize(TOOL, asked, expected, timings, cpu_pct=None, note=note)
