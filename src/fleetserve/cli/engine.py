"""`fleetserve engine ...`: run engine replicas; `sim` runs a SIMULATED vLLM replica."""

from __future__ import annotations

import typer

from fleetserve.cli.common import clear_errors
from fleetserve.engines.sim.profiles import PROFILES, get_profile
from fleetserve.engines.sim.serve import SimServeSettings, run_sim_server

engine_app = typer.Typer(
    name="engine",
    help="Run one engine replica. `sim` is a SIMULATED vLLM replica (no model, no GPU).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_PROFILE_HELP = f"Latency profile: {', '.join(PROFILES)}."
# Paragraphs without inner line breaks: the help renderer keeps single newlines as they are.
_SIM_HELP = "\n\n".join(
    (
        "Run a SIMULATED vLLM replica: this is a simulation, not an LLM.",
        "It speaks the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models), /health "
        "and vLLM's /metrics, and answers with synthetic text on the timing of a latency model "
        "of one vLLM replica: prefill rate, decode step time growing with the batch, a limit on "
        "running requests, KV-cache capacity, prefix cache and cold start. Use it for tests, "
        "benchmarks and capacity studies. The `instant` profile answers at once, as a baseline "
        "for gateway overhead.",
        "Example: fleetserve engine sim --port 8001 --model llama-3.1-8b --profile a10g "
        "--cold-start-s 0",
    )
)


@engine_app.command("sim", help=_SIM_HELP)
@clear_errors
def sim_command(
    port: int = typer.Option(..., "--port", "-p", min=0, max=65535, help="Port to listen on."),
    model: str = typer.Option(..., "--model", "-m", help="Model name to serve (any string)."),
    profile: str = typer.Option(..., "--profile", help=_PROFILE_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    cold_start_s: float | None = typer.Option(
        None, "--cold-start-s", min=0.0, help="Seconds before /health is ready (profile's default)."
    ),
    seed: int = typer.Option(0, "--seed", help="Mixed into the text of requests without a seed."),
    max_num_seqs: int | None = typer.Option(
        None, "--max-num-seqs", min=1, help="Requests run at once; the rest queue (profile's)."
    ),
    kv_capacity_tokens: int | None = typer.Option(
        None, "--kv-capacity-tokens", min=16, help="KV cache size in tokens (profile's default)."
    ),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
) -> None:
    """Run a SIMULATED vLLM replica until SIGINT/SIGTERM (help text: _SIM_HELP)."""
    chosen = get_profile(profile).with_overrides(
        cold_start_s=cold_start_s,
        max_num_seqs=max_num_seqs,
        kv_capacity_tokens=kv_capacity_tokens,
    )
    settings = SimServeSettings(
        host=host, port=port, model=model, profile=chosen, seed=seed, log_level=log_level
    )
    run_sim_server(settings)
