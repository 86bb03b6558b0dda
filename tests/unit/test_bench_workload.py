"""Bench's request builders: lengths, bodies, shared prefixes, datasets, traces."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import orjson
import pytest

from fleetserve.bench.lengths import (
    MAX_TOKENS,
    Choice,
    Fixed,
    Length,
    LogNormal,
    Normal,
    Uniform,
    parse_length,
)
from fleetserve.bench.schedule import TraceEntry
from fleetserve.bench.workload import (
    VOCABULARY,
    Api,
    DatasetRow,
    PromptText,
    Workload,
    WorkloadSpec,
    read_dataset,
)
from fleetserve.engines.sim.text import count_tokens
from fleetserve.errors import ConfigError

# --- lengths -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("128", Fixed(128), id="fixed"),
        pytest.param("uniform:lo=64,hi=256", Uniform(64, 256), id="uniform"),
        pytest.param("normal:mean=200,sd=50", Normal(200.0, 50.0), id="normal"),
        pytest.param("normal:mean=200,sd=50,lo=10,hi=300", Normal(200, 50, 10, 300), id="clip"),
        pytest.param("lognormal:mean=300,sd=100", LogNormal(300.0, 100.0), id="lognormal"),
        pytest.param(" Choice:64, 128,128 ", Choice((64, 128, 128)), id="choice"),
    ],
)  # fmt: skip
def test_parse_length(text: str, expected: Length) -> None:
    assert parse_length(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("0", id="zero"),
        pytest.param("12.5", id="fraction"),
        pytest.param("uniform:lo=9,hi=3", id="lo-above-hi"),
        pytest.param("uniform:lo=3", id="missing-hi"),
        pytest.param("normal:mean=5,sd=-1", id="negative-sd"),
        pytest.param("lognormal:mean=0,sd=1", id="lognormal-zero-mean"),
        pytest.param("poisson:mean=3", id="unknown-kind"),
        pytest.param("uniform:lo=1,hi=2,lo=3", id="repeated-key"),
        pytest.param("choice:", id="empty-choice"),
        pytest.param(f"{MAX_TOKENS + 1}", id="too-long"),
    ],
)
def test_bad_lengths_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_length(text)


@pytest.mark.parametrize(
    ("length", "lo", "hi", "mean"),
    [
        pytest.param(Uniform(10, 20), 10, 20, 15.0, id="uniform"),
        pytest.param(Normal(100, 30, 50, 150), 50, 150, 100.0, id="normal-clipped"),
        pytest.param(LogNormal(200, 50), 1, MAX_TOKENS, 200.0, id="lognormal-mean"),
        pytest.param(Choice((1, 3)), 1, 3, 2.0, id="choice"),
    ],
)
def test_draws_stay_in_range_and_center_where_asked(
    length: Length, lo: int, hi: int, mean: float
) -> None:
    rng = random.Random(7)
    draws = [length.draw(rng) for _ in range(4000)]
    assert all(isinstance(d, int) and lo <= d <= hi for d in draws)
    assert statistics.fmean(draws) == pytest.approx(mean, rel=0.03)
    assert draws == [length.draw(r) for r in [random.Random(7)] for _ in range(4000)]


# --- prompts and bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 2, 37, 1000, 70_000])
def test_a_prompt_of_n_tokens_is_n_tokens_for_the_simulated_engine(tokens: int) -> None:
    text = PromptText(seed=3, words=5000)
    for start in (0, 4990, 123_456):
        prompt = text.prompt(start, tokens)
        assert count_tokens(prompt) == tokens
        assert prompt == prompt.strip()
        assert set(prompt.split()) <= set(VOCABULARY)


def test_the_vocabulary_is_plain_lower_case_words() -> None:
    assert all(word.isalpha() and word.islower() for word in VOCABULARY)
    assert len(set(VOCABULARY)) == len(VOCABULARY)


def test_chat_stream_body_asks_for_usage_and_max_tokens() -> None:
    spec = WorkloadSpec(
        model="llama", prompt_tokens=Fixed(20), output_tokens=Fixed(7),
        extra_body={"temperature": 0},
    )  # fmt: skip
    built = Workload(spec, seed=1).next()
    body = orjson.loads(built.body)
    assert built.path == "/v1/chat/completions"
    assert (built.stream, built.output_tokens, built.prompt_tokens, built.group) == (
        True, 7, 20, None)  # fmt: skip
    assert body["model"] == "llama"
    assert body["max_tokens"] == 7
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0
    assert "ignore_eos" not in body
    [message] = body["messages"]
    assert message["role"] == "user"
    assert count_tokens(message["content"]) == 20


def test_completions_without_stream() -> None:
    spec = WorkloadSpec(model="m", api="completions", stream=False, prompt_tokens=Fixed(9))
    built = Workload(spec, seed=1).next()
    body = orjson.loads(built.body)
    assert built.path == "/v1/completions"
    assert not built.stream
    assert "stream" not in body
    assert "stream_options" not in body
    assert count_tokens(body["prompt"]) == 9


def test_same_seed_same_bodies_other_seed_other_bodies() -> None:
    spec = WorkloadSpec(model="m", prompt_tokens=Uniform(5, 50), output_tokens=Uniform(1, 9))

    def bodies(seed: int) -> list[bytes]:
        workload = Workload(spec, seed=seed)
        return [workload.next().body for _ in range(20)]

    assert bodies(5) == bodies(5)
    assert bodies(5) != bodies(6)
    assert len(set(bodies(5))) == 20


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_shared_prefix_groups(api: Api) -> None:
    spec = WorkloadSpec(
        model="m",
        api=api,
        prompt_tokens=Fixed(10),
        prefix_groups=3,
        prefix_tokens=50,
    )
    workload = Workload(spec, seed=2)
    prefixes: dict[str, set[str]] = {}
    for _ in range(60):
        built = workload.next()
        body = orjson.loads(built.body)
        assert built.group is not None
        assert built.prompt_tokens == 60
        if api == "chat":
            system, user = body["messages"]
            assert system["role"] == "system"
            assert count_tokens(user["content"]) == 10
            prefix = system["content"]
        else:
            prefix = " ".join(body["prompt"].split()[:50])
            assert count_tokens(body["prompt"]) == 60
        assert count_tokens(prefix) == 50
        prefixes.setdefault(built.group, set()).add(prefix)
    assert sorted(prefixes) == ["g0", "g1", "g2"]
    assert all(len(texts) == 1 for texts in prefixes.values())  # one prefix per group
    assert len({next(iter(texts)) for texts in prefixes.values()}) == 3  # distinct groups


@pytest.mark.parametrize(
    ("kwargs"),
    [
        pytest.param({"prefix_groups": 2}, id="groups-without-tokens"),
        pytest.param({"prefix_tokens": 20}, id="tokens-without-groups"),
        pytest.param({"api": "embeddings"}, id="unknown-api"),
        pytest.param({"api": "completions", "dataset": (DatasetRow(messages=(("user", "x"),)),)},
                     id="completions-need-prompts"),
    ],
)  # fmt: skip
def test_bad_specs(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        WorkloadSpec(model="m", **kwargs)  # type: ignore[arg-type]


def test_trace_entries_bring_their_own_lengths_or_prompt() -> None:
    workload = Workload(WorkloadSpec(model="m", output_tokens=Fixed(5)), seed=1)
    sized = workload.for_trace(TraceEntry(1.0, prompt_tokens=33, output_tokens=4))
    body = orjson.loads(sized.body)
    assert (sized.prompt_tokens, sized.output_tokens, body["max_tokens"]) == (33, 4, 4)
    assert count_tokens(body["messages"][0]["content"]) == 33
    given = workload.for_trace(TraceEntry(2.0, prompt="Tell me a story"))
    assert orjson.loads(given.body)["messages"][0]["content"] == "Tell me a story"
    assert (given.prompt_tokens, given.output_tokens) == (None, 5)


# --- dataset files --------------------------------------------------------------------------------


def test_jsonl_dataset_rows_in_order_and_cycling(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(
        '{"prompt": "first", "output_tokens": 3}\n\n'
        '{"messages": [{"role": "system", "content": "be brief"},'
        ' {"role": "user", "content": "hi"}], "max_tokens": 9}\n'
    )
    rows = read_dataset(path)
    assert rows == (
        DatasetRow(prompt="first", output_tokens=3),
        DatasetRow(messages=(("system", "be brief"), ("user", "hi")), output_tokens=9),
    )
    workload = Workload(WorkloadSpec(model="m", dataset=rows, output_tokens=Fixed(2)), seed=0)
    built = [workload.next() for _ in range(3)]
    bodies = [orjson.loads(b.body) for b in built]
    assert bodies[0]["messages"] == [{"role": "user", "content": "first"}]
    assert bodies[1]["messages"][0] == {"role": "system", "content": "be brief"}
    assert [b["max_tokens"] for b in bodies] == [3, 9, 3]
    assert built[2].body == built[0].body


def test_csv_dataset(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('prompt,output_tokens\n"Hello, world",4\nplain,\n')
    assert read_dataset(path) == (
        DatasetRow(prompt="Hello, world", output_tokens=4),
        DatasetRow(prompt="plain"),
    )


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        pytest.param("d.jsonl", "{not json}\n", "not valid JSON", id="bad-json"),
        pytest.param("d.jsonl", "[1]\n", "expected a JSON object", id="not-object"),
        pytest.param("d.jsonl", '{"output_tokens": 3}\n', "needs a non-empty", id="no-prompt"),
        pytest.param("d.jsonl", '{"prompt": "x", "output_tokens": 0}\n', "must be >= 1",
                     id="zero-output"),
        pytest.param("d.jsonl", '{"messages": [{"role": "user"}]}\n', "content", id="no-content"),
        pytest.param("d.jsonl", "\n", "has no requests", id="empty"),
        pytest.param("d.csv", "text\nhello\n", "no 'prompt' column", id="csv-no-prompt"),
    ],
)  # fmt: skip
def test_bad_datasets(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_dataset(path)


def test_missing_dataset_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read dataset"):
        read_dataset(tmp_path / "absent.jsonl")
