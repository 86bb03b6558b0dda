"""`fleetserve bench --tenants FILE` as a user runs it: against the simulated engine itself, and
against a small gateway-like front in this test that refuses some keys the way a tenancy
gateway does (401, 403 and 429 in OpenAI's error envelope, with x-ratelimit-* headers)."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from fleetserve.fleet.processes import free_port
from fleetserve.testing.processes import ManagedProcess
from fleetserve.testing.stack import fleetserve_argv

pytestmark = pytest.mark.integration

MODEL = "sim-tenants"
READY_TIMEOUT_S = 20.0
BENCH_TIMEOUT_S = 45.0


def new_key(prefix: str) -> str:
    return f"fs-{prefix}-{secrets.token_urlsafe(32)}"


@pytest.fixture
async def sim_url(tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    argv = fleetserve_argv("engine", "sim", "--port", str(port), "--model", MODEL,
                           "--profile", "instant", "--cold-start-s", "0")  # fmt: skip
    async with ManagedProcess(argv, log_path=tmp_path / "sim.log") as proc:
        url = f"http://127.0.0.1:{port}"
        await proc.wait_http_ok(f"{url}/health", READY_TIMEOUT_S)
        yield url


async def bench(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run `fleetserve bench ARGS` as a process without blocking this loop (a front may be
    serving on it); kill it if it runs past the bound."""
    proc = await asyncio.create_subprocess_exec(
        *fleetserve_argv("bench", *args), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", **env},
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BENCH_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def written(out: Path) -> str:
    return "".join(path.read_text() for path in sorted(out.iterdir()))


async def test_tenants_at_once_against_the_simulated_engine(sim_url: str, tmp_path: Path) -> None:
    alpha, beta = new_key("Alpha001"), new_key("Beta0002")
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(f"""
tenants:
  - name: alpha
    key: {alpha}
    users: 2
    output_tokens: 8
  - name: beta
    key_env: BETA_KEY
    rate_rps: 20
    stream: false
    output_tokens: 4
  - name: gamma          # everything from the command: --rate 10, constant, 6 tokens
""")
    out = tmp_path / "run"
    code, stdout, stderr = await bench(
        "--url", sim_url, "--model", MODEL, "--tenants", str(tenants), "--rate", "10",
        "--arrivals", "constant", "--duration", "1.5", "--output-tokens", "6",
        "--prompt-tokens", "16", "--fleet-source", "none", "--out", str(out),
        env={"BETA_KEY": beta},
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    section = {t["name"]: t for t in report["tenants"]}
    assert list(section) == ["alpha", "beta", "gamma"]
    a, b, g = section["alpha"], section["beta"], section["gamma"]
    assert (b["requests"], g["requests"]) == (30, 15)  # 20 and 10 req/s, constant, for 1.5 s
    assert a["requests"] >= 4  # two users, each answered at once
    for t in (a, b, g):
        assert t["ok"] == t["requests"], t
        assert (t["rejected"], t["errors"]) == (0, 0)
        assert t["prompt_tokens"] > 0
    assert (a["output_tokens"], b["output_tokens"], g["output_tokens"]) == (
        8 * a["ok"], 4 * 30, 6 * 15
    )  # fmt: skip
    total = a["output_tokens"] + b["output_tokens"] + g["output_tokens"]
    for t in (a, b, g):
        assert t["output_share_frac"] == pytest.approx(t["output_tokens"] / total)
    assert b["ttft_p50_s"] is None  # not streamed
    assert b["e2e_p95_s"] is not None
    assert a["ttft_p95_s"] is not None
    assert (a["key_prefix"], a["key_source"]) == ("fs-Alpha001", "key")
    assert (b["key_prefix"], b["key_source"]) == ("fs-Beta0002", "key_env BETA_KEY")
    assert g["key_source"] == "none"
    assert report["totals"]["requests"] == sum(t["requests"] for t in (a, b, g))
    assert report["config"]["simulated"] is True
    with (out / "requests.csv").open() as handle:
        per_request = Counter(row["tenant"] for row in csv.DictReader(handle))
    assert per_request == {"alpha": a["requests"], "beta": 30, "gamma": 15}
    assert (out / "tenants.csv").read_text().count("\n") == 4  # header and three tenants
    assert "<h2>Tenants</h2>" in (out / "report.html").read_text()
    assert "Tenants: tokens and latency" in stdout
    for secret in (alpha, beta):
        assert secret.split("-", 2)[2] not in stdout + stderr + written(out)


class FakeGateway:
    """In front of the simulated engine: each key gets what a tenancy gateway would give it.

    `keys` maps a key to `forward`, `invalid` (401), `model` (403 for any model but MODEL),
    `quota` (429 insufficient_quota) or `limit:N` (N requests forwarded, then 429
    rate_limit_exceeded). Every answer to a known key carries x-ratelimit-remaining-*.
    """

    def __init__(self, upstream: str, keys: dict[str, str]) -> None:
        self.upstream, self.keys = upstream, keys
        self.seen: Counter[str] = Counter()  # requests by the key they carried
        self.admitted: Counter[str] = Counter()

    async def __aenter__(self) -> FakeGateway:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        self.session = aiohttp.ClientSession()
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
        await self.session.close()

    @staticmethod
    def refuse(status: int, code: str, error_type: str, headers: dict[str, str]) -> web.Response:
        body = {"error": {"message": f"refused: {code}", "type": error_type, "param": None,
                          "code": code}}  # fmt: skip
        return web.json_response(body, status=status, headers=headers)

    def key_of(self, request: web.Request) -> str:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        return key if scheme == "Bearer" else ""

    async def models(self, request: web.Request) -> web.StreamResponse:
        if self.keys.get(self.key_of(request)) != "forward":
            return self.refuse(401, "invalid_api_key", "authentication_error", {})
        async with self.session.get(f"{self.upstream}/v1/models") as upstream:
            return web.Response(body=await upstream.read(), content_type="application/json")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        key = self.key_of(request)
        self.seen[key] += 1
        policy = self.keys.get(key, "invalid")
        body = await request.read()
        limit = int(policy.split(":")[1]) if policy.startswith("limit:") else None
        left = 1_000_000 if limit is None else limit - self.admitted[key] - 1
        headers = {
            "x-ratelimit-remaining-requests": str(max(0, left)),
            "x-ratelimit-remaining-tokens": str(max(0, 1_000_000 - 100 * self.admitted[key])),
        }
        if policy == "invalid":
            return self.refuse(401, "invalid_api_key", "authentication_error", {})
        if policy == "model" and json.loads(body).get("model") != MODEL:
            return self.refuse(403, "model_not_allowed", "permission_error", headers)
        if policy == "quota":
            return self.refuse(429, "insufficient_quota", "insufficient_quota", headers)
        if limit is not None and self.admitted[key] >= limit:
            headers["x-ratelimit-remaining-requests"] = "0"
            return self.refuse(429, "rate_limit_exceeded", "rate_limit_error",
                               {**headers, "Retry-After": "1"})  # fmt: skip
        self.admitted[key] += 1
        async with self.session.post(
            f"{self.upstream}{request.path}", data=body,
            headers={"Content-Type": "application/json"},
        ) as upstream:  # fmt: skip
            answer = web.StreamResponse(status=upstream.status, headers=headers)
            answer.content_type = upstream.content_type
            await answer.prepare(request)
            async for chunk in upstream.content.iter_any():
                await answer.write(chunk)
            await answer.write_eof()
            return answer


async def test_refusals_are_counted_per_tenant_by_reason(sim_url: str, tmp_path: Path) -> None:
    fine, limited, revoked = new_key("Fine0001"), new_key("Limit001"), new_key("Revoked1")
    broke, nosy = new_key("Broke001"), new_key("Nosy0001")
    policies = {fine: "forward", limited: "limit:3", broke: "quota", nosy: "model",
                revoked: "invalid"}  # fmt: skip
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(f"""
tenants:
  - {{name: fine, key: {fine}, users: 2}}
  - {{name: limited, key_env: LIMITED_KEY, rate_rps: 10}}
  - {{name: revoked, key: {revoked}, rate_rps: 4}}
  - {{name: broke, key: {broke}, rate_rps: 4, stream: false}}
  - {{name: nosy, key: {nosy}, rate_rps: 4, model: sim-elsewhere}}
""")
    out = tmp_path / "run"
    async with FakeGateway(sim_url, policies) as gateway:
        code, stdout, stderr = await bench(
            "--url", gateway.url, "--model", MODEL, "--tenants", str(tenants),
            "--arrivals", "constant", "--duration", "1.5", "--output-tokens", "4",
            "--prompt-tokens", "8", "--fleet-source", "none", "--out", str(out),
            env={"LIMITED_KEY": limited},
        )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    section = {t["name"]: t for t in report["tenants"]}
    # Each request carried its own tenant's key: the front saw exactly each tenant's count.
    for name, key in (("fine", fine), ("limited", limited), ("revoked", revoked),
                      ("broke", broke), ("nosy", nosy)):  # fmt: skip
        assert gateway.seen[key] == section[name]["requests"], name
    ok = section["fine"]
    assert ok["ok"] == ok["requests"] >= 4
    assert (ok["rejected"], ok["rejected_by_reason"]) == (0, {})
    assert ok["ratelimit_remaining_tokens"] is not None
    lim = section["limited"]
    assert (lim["requests"], lim["ok"], lim["rejected"], lim["errors"]) == (15, 3, 12, 0)
    assert lim["rejected_by_reason"] == {"rate_limit_exceeded": 12}
    assert lim["ratelimit_remaining_requests"] == 0
    for name, requests, reason in (("revoked", 6, "invalid_api_key"),
                                   ("broke", 6, "insufficient_quota"),
                                   ("nosy", 6, "model_not_allowed")):  # fmt: skip
        t = section[name]
        assert (t["requests"], t["ok"], t["rejected"], t["errors"]) == (requests, 0, requests, 0)
        assert t["rejected_by_reason"] == {reason: requests}
        assert t["output_share_frac"] == 0.0
    assert ok["output_share_frac"] + lim["output_share_frac"] == pytest.approx(1.0)
    assert report["config"]["simulated"] is True  # /v1/models asked with a tenant's key
    assert any("refused by the target's admission" in note for note in report["notes"])
    with (out / "tenants.csv").open() as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    assert rows["limited"]["rejected_rate_limit_exceeded"] == "12"
    assert rows["nosy"]["rejected_model_not_allowed"] == "6"
    assert "rate_limit_exceeded 12" in stdout
    for secret in policies:
        assert secret.split("-", 2)[2] not in stdout + stderr + written(out)


async def test_help_shows_a_tenants_example_and_bad_input_is_one_line(tmp_path: Path) -> None:
    code, stdout, _ = await bench("--help", env={})
    assert code == 0
    assert "--tenants tenants.yaml" in stdout
    key = new_key("Secret01")
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(f"tenants:\n  - {{name: a, key: {key}, users: 2, rate_rps: 1}}\n")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the file fails first
    for args, words in (
        (("--tenants", str(tenants)), "tenants[0] (a): give one of rate_rps, users"),
        (("--tenants", str(tenants), "--trace", str(tenants)), "does not combine with --trace"),
        (("--tenants", str(tmp_path / "missing.yaml")), "cannot read tenants file"),
    ):
        code, stdout, stderr = await bench("--url", url, "--model", MODEL, *args, env={})
        assert code == 2, stderr
        assert words in stderr
        assert stderr.strip().count("\n") == 0  # one line, no traceback
        assert key.split("-", 2)[2] not in stdout + stderr
