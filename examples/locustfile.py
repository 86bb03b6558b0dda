"""Load an OpenAI-compatible endpoint from Locust, with `fleetserve bench`'s request builder.

    pip install locust          # in the environment where fleetserve is installed
    locust -f examples/locustfile.py --host http://127.0.0.1:8000 --model llama
    locust -f examples/locustfile.py --host http://127.0.0.1:8000 --model llama \\
        --headless -u 50 -r 10 -t 60s --prompt-tokens uniform:lo=64,hi=512 --output-tokens 128

Each user sends one request after another (a closed loop, like `fleetserve bench --users`).
Besides the row Locust makes for the request itself (the time to the response head), every
answer adds rows of its own: `TTFT` (first chunk carrying generated text), `TPOT` (time per
output token after the first) and `e2e` (the whole stream). A stream that carries an error
event or ends without `[DONE]` fails its `e2e` row. Options also come from FLEETSERVE_*
environment variables (see `examples/README.md`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from locust import HttpUser, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust_requests import (  # beside this file: Locust puts its folder on sys.path
    OPTIONS,
    StreamReader,
    StreamTiming,
    build_workload,
    request_headers,
    whole_body_timing,
)

from fleetserve.bench.workload import Workload
from fleetserve.errors import ConfigError

READ_TIMEOUT_S = 600.0  # a long generation may stream for minutes


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    for name, (env_var, default, help_text) in OPTIONS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            default=default,
            env_var=env_var,
            help=f"{help_text} [env {env_var}]",
            is_secret=name == "api_key",
        )


class ChatUser(HttpUser):
    """Sends bench-built requests back to back and reports TTFT, TPOT and e2e."""

    workload: Workload | None = None  # built once per run, in `_build_workload`
    config_error = ""

    def on_start(self) -> None:
        self.headers = request_headers(str(self.environment.parsed_options.api_key))

    @task
    def generate(self) -> None:
        if ChatUser.workload is None:
            self.environment.events.request.fire(
                request_type="CONFIG", name="options", response_time=0, response_length=0,
                exception=ConfigError(ChatUser.config_error or "no workload"), context={},
            )  # fmt: skip
            raise StopUser
        request = ChatUser.workload.next()
        start = time.perf_counter()
        with self.client.post(
            request.path,
            data=request.body,
            headers=self.headers,
            stream=request.stream,
            catch_response=True,
            timeout=(10.0, READ_TIMEOUT_S),
        ) as response:
            if response.status_code != 200:
                return  # Locust fails the request row with the status and its text
            timing = self._read(response, request.stream, start)
            if timing.error is not None:
                response.failure(timing.error)
        self._report(timing)

    def _read(self, response: Any, stream: bool, start: float) -> StreamTiming:
        try:
            if not stream:
                return whole_body_timing(response.content, time.perf_counter() - start)
            reader = StreamReader()
            # chunk_size=None yields each piece as it arrives, so the TTFT is not held back.
            for part in response.iter_content(chunk_size=None):
                reader.feed(part, time.perf_counter() - start)
            return reader.finish(time.perf_counter() - start)
        except OSError as error:  # requests' errors derive from it: a reset or a read timeout
            return StreamTiming(time.perf_counter() - start, None, 0, None, 0, repr(error))

    def _report(self, timing: StreamTiming) -> None:
        fire = self.environment.events.request.fire
        failure = None if timing.error is None else RuntimeError(timing.error)
        fire(request_type="STREAM", name="e2e", response_time=timing.e2e_s * 1000,
             response_length=timing.received_bytes, exception=failure, context={})  # fmt: skip
        if timing.error is not None:
            return
        if timing.ttft_s is not None:
            fire(request_type="STREAM", name="TTFT", response_time=timing.ttft_s * 1000,
                 response_length=0, exception=None, context={})  # fmt: skip
        if timing.tpot_s is not None:
            fire(request_type="STREAM", name="TPOT", response_time=timing.tpot_s * 1000,
                 response_length=0, exception=None, context={})  # fmt: skip


@events.init.add_listener
def _check_options(environment: Environment, **_: Any) -> None:
    """Headless, a bad option stops here with its message (the web UI can still fix it)."""
    options = environment.parsed_options
    if options is not None and options.headless:
        try:
            build_workload(vars(options))
        except ConfigError as error:
            logging.error("locustfile: %s", error)  # noqa: TRY400 - a bad option, no traceback
            raise SystemExit(2) from None


@events.test_start.add_listener
def _build_workload(environment: Environment, **_: Any) -> None:
    """One workload for all users (gevent runs them in one thread), seeded once per run."""
    options = vars(environment.parsed_options)
    try:
        ChatUser.workload = build_workload(options)
    except ConfigError as error:
        ChatUser.workload, ChatUser.config_error = None, str(error)
        logging.error("locustfile: %s", error)  # noqa: TRY400 - a bad option, no traceback
