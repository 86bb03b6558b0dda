"""`fleetserve up`: a whole local fleet (engine replicas + gateway) on this machine."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import typer
from pydantic import ValidationError

from fleetserve.cli.admin_client import ensure_default_key
from fleetserve.cli.common import (
    access_log_option,
    admin_key_file_option,
    admin_key_option,
    auth_option,
    clear_errors,
    ensure_port_free,
    log_format_option,
    settings_from,
    teller,
    with_auth,
)
from fleetserve.config import (
    DEFAULT_PICKER,
    DRAIN_GRACE_S,
    AutoscaleSettings,
    EngineName,
    GatewaySettings,
    ModelSpec,
    PickerName,
    PriceSpec,
    admin_api_line,
    describe_errors,
    load_fleet_file,
)
from fleetserve.engines.llamacpp.adapter import threads_per_replica
from fleetserve.engines.llamacpp.build import find_llama_server
from fleetserve.engines.llamacpp.model import load_model
from fleetserve.engines.registry import adapter_for
from fleetserve.engines.sim.profiles import get_profile
from fleetserve.errors import ConfigError
from fleetserve.gateway.app import auth_mode
from fleetserve.stack import (
    AutoscaledStackSpec,
    LocalStackSpec,
    run_autoscaled_stack,
    run_local_stack,
)

DEFAULT_SIM_MODEL = "sim-llama-3.1-8b"
ENGINES: tuple[EngineName, ...] = ("llamacpp", "sim", "vllm")
MAX_REPLICAS = 64
# KV-cache tokens one request holds at the sim's sizing point: benchmarks/autoscale_compare's
# mix (prompts 384-640, answers 128-256: 704 at the end on average) with ~14 % headroom. On the
# a10g profile that gives 32 in flight, the cap that study found to keep the engine's TTFT p95
# at 0.6 s with 97 % of the replica's most throughput (36: 1.7 s; 40 and more: the KV cache is
# full and requests wait inside the engine, where a new replica cannot take them).
SIM_TOKENS_PER_REQUEST = 800
# The options that are GatewaySettings fields: given ones outrank FLEETSERVE_* and the fleet file.
SETTINGS_OPTIONS = ("port", "host", "workers", "fleet_file", "admin_key", "admin_key_file",
                    "log_format", "access_log")  # fmt: skip


def _engine_setup(
    engine: str, model: str | None, replicas: int, options: dict[str, str]
) -> tuple[EngineName, str, dict[str, str], str]:
    """(engine, served model name, launch options, what to tell the user) for one engine."""
    if engine == "llamacpp":
        find_llama_server()  # fails early, with how to build it
        gguf = load_model(Path(model) if model else None)
        threads = options.get("threads") or str(threads_per_replica(replicas))
        opts = {"model_path": str(gguf.path), "threads": threads, "slots": options["slots"]}
        note = (
            f"{gguf.path.name} ({gguf.size_bytes / 2**20:.0f} MiB) on llama.cpp, "
            f"{threads} thread(s) and {options['slots']} slots per replica"
        )
        return "llamacpp", gguf.name, opts, note
    if engine == "sim":
        name = model or DEFAULT_SIM_MODEL
        opts = {"profile": options["profile"], "cold_start_s": options["cold_start_s"]}
        note = f"profile {options['profile']}: a SIMULATED engine, not a real model"
        return "sim", name, opts, note
    if engine == "vllm":
        if not model:
            raise ConfigError("--engine vllm needs --model (a Hugging Face id or local path)")
        if shutil.which("vllm") is None:
            raise ConfigError("--engine vllm needs vLLM installed (`vllm` is not on PATH)")
        return "vllm", model, {}, "vLLM (GPU)"
    raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


@clear_errors
def up_command(
    ctx: typer.Context,
    engine: str = typer.Option("llamacpp", help="llamacpp (a real small model), sim or vllm."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="llamacpp: a .gguf file (default: the packaged SmolLM2-135M-Instruct); "
        "sim: a model name; vllm: a model id.",
    ),
    replicas: str = typer.Option(
        "2",
        "--replicas",
        "-n",
        help="Engine replicas: N for a fixed fleet, MIN:MAX to autoscale (MIN may be 0).",
    ),
    fleet_file: Path | None = typer.Option(
        None,
        "--fleet-file",
        "-f",
        help="A fleet file (FLEETSERVE_FLEET_FILE): its `gateway:` section sets gateway "
        "settings; with MIN:MAX, its model's `autoscale:` section sets the policy.",
    ),
    ttft_slo_s: float | None = typer.Option(
        None, "--ttft-slo", min=0.001, help="Autoscale: keep the gateway's TTFT p95 under this (s)."
    ),
    drain_grace_s: float = typer.Option(
        DRAIN_GRACE_S, min=0.0, help="Autoscale: seconds a removed replica may finish its requests."
    ),
    port: int = typer.Option(8000, "--port", "-p", help="Gateway port (FLEETSERVE_PORT)."),
    host: str = typer.Option(
        "127.0.0.1",
        help="Gateway address (FLEETSERVE_HOST). Any but a loopback address needs an admin key.",
    ),
    picker: str = typer.Option(
        DEFAULT_PICKER, help="round_robin, least_outstanding, p2c, prefix_affinity."
    ),
    workers: int = typer.Option(1, help="Gateway worker processes (FLEETSERVE_WORKERS)."),
    threads: int | None = typer.Option(
        None, help="llamacpp: threads per replica (default: cores / replicas)."
    ),
    slots: int = typer.Option(8, min=1, help="llamacpp: parallel sequences per replica."),
    profile: str = typer.Option("a10g", help="sim: latency profile (a10g, l4, h100, instant)."),
    cold_start_s: float = typer.Option(1.0, min=0.0, help="sim: simulated load time per replica."),
    max_concurrency: int | None = typer.Option(
        None,
        "--max-concurrency",
        min=1,
        help="Autoscale: requests in flight per replica; the gateway queues the rest so new "
        "replicas take the backlog. Default: llamacpp its --slots; sim what fits the profile's "
        "KV cache at ~800 tokens a request (a10g: 32); vllm no cap.",
    ),
    admin_key: str | None = admin_key_option("that the gateway's /admin/* requires"),
    admin_key_file: Path | None = admin_key_file_option(),
    auth: str | None = auth_option(),
    log_format: str = log_format_option(),
    access_log: bool | None = access_log_option(),
) -> None:
    """Start engine replicas and the gateway on this machine; Ctrl-C stops everything.

    Examples:

      fleetserve up --replicas 2 --port 8000      (llama.cpp serving SmolLM2 on the CPU)

      fleetserve up --engine sim --profile a10g --replicas 1:8 --ttft-slo 2   (autoscaled)

      fleetserve up --engine sim --log-format json   (JSON lines, one access line per request)

    Gateway settings, highest first: a flag, the environment (FLEETSERVE_<NAME>), the fleet
    file's `gateway:` section, the default.
    """
    settings = with_auth(settings_from(ctx, *SETTINGS_OPTIONS), auth)
    admin = admin_api_line(settings)
    low, high = _replica_range(replicas)
    fleet_file = settings.fleet_file
    autoscale = _autoscale(low, high, fleet_file, ttft_slo_s) if low != high else None
    options = {
        "threads": str(threads) if threads else "",
        "slots": str(slots),
        "profile": profile,
        "cold_start_s": str(cold_start_s),
    }
    if autoscale is None and max_concurrency is not None:
        raise ConfigError("--max-concurrency applies to an autoscaled fleet (--replicas MIN:MAX)")
    engine_name, served, launch_options, note = _engine_setup(engine, model, high, options)
    cap = None
    if autoscale is not None:
        cap = _max_concurrency(engine_name, max_concurrency, slots, profile, autoscale)
        note += f"; at most {cap} in flight per replica" if cap else "; no in-flight cap"
    ensure_port_free(settings.host, settings.port, "the gateway")

    tell = teller(settings.log_format)

    def say(line: str) -> None:
        tell(f"[dim]fleetserve[/] {line}")

    endpoint = f"http://{settings.host}:{settings.port}"
    keys = auth_mode(settings) == "keys"
    token = _default_key(settings) if keys else None

    def announce() -> None:
        _print_ready(tell, endpoint, served, keys, token)

    try:
        if autoscale is None:
            tell(f"[bold]fleetserve up[/]: {low} replica(s) of [cyan]{served}[/]: {note}")
            say(admin)
            spec = LocalStackSpec(
                adapter=adapter_for(engine_name),
                model=served,
                replicas=low,
                options=launch_options,
                engine_name=engine_name,
                picker=_picker(picker),
            )
            run_local_stack(spec, settings, say, on_ready=announce)
        else:
            tell(
                f"[bold]fleetserve up[/]: {low} to {high} replicas of [cyan]{served}[/], "
                f"autoscaled: {note}"
            )
            say(admin)
            scaled = AutoscaledStackSpec(
                adapter=adapter_for(engine_name),
                model=served,
                options=launch_options,
                engine_name=engine_name,
                picker=_picker(picker),
                autoscale=autoscale,
                drain_grace_s=drain_grace_s,
                max_concurrency=cap,
                pricing=_pricing(fleet_file),
            )
            run_autoscaled_stack(scaled, settings, on_ready=announce)
    except KeyboardInterrupt:
        tell("stopping")
    tell("all replicas stopped")


def _replica_range(text: str) -> tuple[int, int]:
    """`N` -> (N, N); `MIN:MAX` -> (MIN, MAX), with 0 <= MIN <= MAX, 1 <= MAX <= 64."""
    low_text, sep, high_text = text.partition(":")
    try:
        low = int(low_text)
        high = int(high_text) if sep else low
    except ValueError:
        raise ConfigError(f"--replicas takes N or MIN:MAX (e.g. 2 or 1:8), not {text!r}") from None
    if not sep and low < 1:
        raise ConfigError("--replicas N needs N >= 1 (use 0:MAX to autoscale from zero)")
    if not 0 <= low <= high or not 1 <= high <= MAX_REPLICAS:
        raise ConfigError(f"--replicas {text}: need 0 <= MIN <= MAX and 1 <= MAX <= {MAX_REPLICAS}")
    return low, high


def _autoscale(
    low: int, high: int, fleet_file: Path | None, ttft_slo_s: float | None
) -> AutoscaleSettings:
    """The policy: the fleet file's `autoscale:` section (if any), bounds from --replicas."""
    base: dict[str, object] = {}
    if fleet_file is not None:
        specs = [m for m in load_fleet_file(fleet_file).models if m.autoscale is not None]
        if len(specs) != 1:
            raise ConfigError(
                f"{fleet_file}: `up` needs exactly one model with an `autoscale:` section, "
                f"found {len(specs)}"
            )
        base = specs[0].autoscale.model_dump() if specs[0].autoscale else {}
    base.update(min_replicas=low, max_replicas=high)
    if ttft_slo_s is not None:
        base["ttft_slo_s"] = ttft_slo_s
    try:
        return AutoscaleSettings.model_validate(base)
    except ValidationError as exc:
        raise ConfigError(f"autoscale settings are invalid: {describe_errors(exc)}") from exc


def _pricing(fleet_file: Path | None) -> PriceSpec | None:
    """The `pricing:` of the fleet file's autoscaled model (`_autoscale` checked there is
    one), so that tenants' costs and budgets apply under `up` as under `gateway`."""
    if fleet_file is None:
        return None
    return next(m.pricing for m in load_fleet_file(fleet_file).models if m.autoscale is not None)


def _max_concurrency(
    engine: EngineName,
    given: int | None,
    slots: int,
    profile: str,
    autoscale: AutoscaleSettings,
) -> int | None:
    """The in-flight cap per replica: given, or what the engine can batch; above the target."""
    cap = given
    if cap is None and engine == "llamacpp":
        cap = slots  # more only wait inside llama-server, where a new replica cannot take them
    elif cap is None and engine == "sim":
        sim = get_profile(profile)
        cap = max(1, min(sim.max_num_seqs, sim.kv_capacity_tokens // SIM_TOKENS_PER_REQUEST))
    if cap is not None and cap <= autoscale.target_concurrency:
        source = "--max-concurrency" if given is not None else f"the default for {engine}"
        raise ConfigError(
            f"{source} ({cap} per replica) must exceed the autoscaler's target_concurrency "
            f"({autoscale.target_concurrency:g}): at the cap, replicas would read as under "
            f"target while requests queue. Raise --max-concurrency (llamacpp: --slots) or set "
            f"a lower target_concurrency in the fleet file's autoscale section"
        )
    return cap


def _picker(name: str) -> PickerName:
    try:
        return ModelSpec(name="x", picker=name).picker
    except ValueError as exc:
        raise ConfigError(f"unknown picker {name!r}") from exc


def _default_key(settings: GatewaySettings) -> str | None:
    """The `default` tenant's first key, made on the first `up --auth keys` (else None)."""
    tenancy = settings.tenancy
    url = tenancy.database_url.get_secret_value() if tenancy.database_url else None
    pepper = tenancy.key_pepper.get_secret_value() if tenancy.key_pepper else None
    return asyncio.run(ensure_default_key(url, pepper))


def _print_ready(
    tell: Callable[[str], None],
    endpoint: str,
    model: str,
    keys: bool = False,
    token: str | None = None,
) -> None:
    tell(f"\n[bold green]ready[/]: OpenAI-compatible endpoint {endpoint}/v1")
    tell(f"live dashboard: {endpoint}/dashboard")
    auth = ""
    if keys:
        auth = f"-H 'Authorization: Bearer {token or '$FLEETSERVE_API_KEY'}' "
        if token:
            tell(f"tenant [cyan]default[/] and its key (shown once, store it): {token}")
        else:
            tell(
                "auth: keys (tenant `default` exists; make a key with "
                "`fleetserve keys create --tenant default`)"
            )
    tell(
        f"try:\n  curl {endpoint}/v1/chat/completions -H 'Content-Type: application/json' "
        f"{auth}\\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", '
        f'"content": "Which city is the capital of France?"}}], "temperature": 0}}\'\n'
    )
