"""`fleetserve up --replicas MIN:MAX --max-concurrency`: the per-replica cap and its default."""

from __future__ import annotations

import pytest

from fleetserve.cli.up import _max_concurrency
from fleetserve.config import AutoscaleSettings, EngineName
from fleetserve.errors import ConfigError

DEFAULT = AutoscaleSettings()  # target_concurrency 6


@pytest.mark.parametrize(
    ("engine", "given", "slots", "profile", "cap"),
    [
        pytest.param("llamacpp", None, 8, "a10g", 8, id="llamacpp-its-slots"),
        pytest.param("llamacpp", 12, 8, "a10g", 12, id="llamacpp-given"),
        pytest.param("sim", None, 8, "a10g", 32, id="sim-a10g-kv-fits-32"),
        pytest.param("sim", None, 8, "l4", 32, id="sim-l4-same-kv"),
        pytest.param("sim", None, 8, "h100", 543, id="sim-h100-kv-fits-543"),
        pytest.param("sim", None, 8, "instant", 1024, id="sim-instant-max-num-seqs"),
        pytest.param("sim", 20, 8, "a10g", 20, id="sim-given"),
        pytest.param("vllm", None, 8, "a10g", None, id="vllm-no-cap-by-default"),
        pytest.param("vllm", 64, 8, "a10g", 64, id="vllm-given"),
    ],
)
def test_cap_per_engine(
    engine: EngineName, given: int | None, slots: int, profile: str, cap: int | None
) -> None:
    assert _max_concurrency(engine, given, slots, profile, DEFAULT) == cap


@pytest.mark.parametrize(
    ("engine", "given", "slots", "target", "says"),
    [
        pytest.param("llamacpp", None, 4, 6.0, "the default for llamacpp (4 per replica)",
                     id="few-slots-under-the-default-target"),
        pytest.param("sim", 6, 8, 6.0, "--max-concurrency (6 per replica)", id="cap-equals-target"),
        pytest.param("vllm", 16, 8, 24.0, "target_concurrency (24)", id="target-above-cap"),
    ],
)  # fmt: skip
def test_cap_must_exceed_the_target(
    engine: EngineName, given: int | None, slots: int, target: float, says: str
) -> None:
    settings = AutoscaleSettings(target_concurrency=target)
    with pytest.raises(ConfigError) as caught:
        _max_concurrency(engine, given, slots, "a10g", settings)
    assert says in str(caught.value)
