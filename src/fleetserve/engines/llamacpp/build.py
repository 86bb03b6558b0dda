"""Build llama.cpp's `llama-server` once, into a per-user cache keyed by version and flags.

No wheel ships the binary, but the llama-cpp-python sdist on PyPI vendors llama.cpp's sources,
so set-up downloads that sdist with pip (a registry package) and builds only the server target
with CMake and Ninja. Nothing is downloaded when fleetserve runs.

`python -m fleetserve.engines.llamacpp.build` is what `make up` / `make test` call; it prints
progress and is a no-op (well under a second) when the binary is already cached.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from fleetserve.errors import EngineError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # vendors llama.cpp; its sdist is the source we build
# GGML_NATIVE=OFF: native builds crashed at the first decode on these CPUs (AVX-512/AMX seen).
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)
BINARY_ENV = "FLEETSERVE_LLAMA_SERVER"

Say = Callable[[str], None]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleetserve" / "llama-server"


def build_key() -> str:
    flags = hashlib.blake2b(" ".join(CMAKE_FLAGS).encode(), digest_size=4).hexdigest()
    return f"{LLAMA_CPP_PYTHON_VERSION}-{flags}"


def cached_binary() -> Path:
    return cache_root() / build_key() / "llama-server"


def find_llama_server() -> Path:
    """The binary to run: $FLEETSERVE_LLAMA_SERVER, else the cached build."""
    override = os.environ.get(BINARY_ENV)
    path = Path(override) if override else cached_binary()
    if not path.is_file() or not os.access(path, os.X_OK):
        hint = f"{BINARY_ENV} points to {path}" if override else f"no build at {path}"
        raise EngineError(
            f"llama-server is not built ({hint}); run `make up` (or "
            "`python -m fleetserve.engines.llamacpp.build`) once to build it"
        )
    return path


def _missing_tools() -> list[str]:
    missing = []
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        missing.append("a C++ compiler (Debian: apt-get install g++)")
    if not shutil.which("cmake", path=_tool_path()):
        missing.append("cmake (pip install cmake, or apt-get install cmake)")
    if not shutil.which("ninja", path=_tool_path()):
        missing.append("ninja (pip install ninja, or apt-get install ninja-build)")
    return missing


def _tool_path() -> str:
    """PATH with this interpreter's scripts first, where pip puts cmake and ninja."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _run(cmd: list[str], cwd: Path, say: Say) -> None:
    env = {**os.environ, "PATH": _tool_path()}
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        tail: list[str] = []
        for raw in proc.stdout:
            line = raw.rstrip()
            tail = [*tail[-39:], line]
            if line.startswith("[") or "error" in line.lower():  # ninja's [n/N] progress
                say(line)
        if proc.wait() != 0:
            raise EngineError(f"`{' '.join(cmd[:3])} ...` failed; last lines:\n" + "\n".join(tail))


def _fetch_sources(work: Path, say: Say) -> Path:
    say(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sources (PyPI sdist)")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         # Source for this package only: ":all:" would also build its build tools from source.
         "--no-binary", "llama-cpp-python",
         f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(work)],
        check=True,
    )  # fmt: skip
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(work, members=members, filter="data")
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


def ensure_llama_server(say: Say = print) -> Path:
    """Return the cached binary, building it first if needed."""
    target = cached_binary()
    if target.is_file():
        return target
    missing = _missing_tools()
    if missing:
        raise EngineError("cannot build llama-server; missing: " + "; ".join(missing))
    jobs = str(max(1, len(os.sched_getaffinity(0))))
    say(f"building llama-server ({build_key()}) with {jobs} jobs; about 5 minutes on 2 cores")
    with tempfile.TemporaryDirectory(prefix="fleetserve-llama-build-") as tmp:
        work = Path(tmp)
        try:
            source = _fetch_sources(work, say)
        except (subprocess.CalledProcessError, StopIteration) as exc:
            raise EngineError(f"could not get llama.cpp sources from PyPI: {exc}") from exc
        build = work / "build"
        _run(["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", *CMAKE_FLAGS], work, say)
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], work, say)
        built = build / "bin" / "llama-server"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(target)  # atomic: a cache entry is whole or absent
    say(f"llama-server built: {target}")
    return target


def main() -> None:
    try:
        path = ensure_llama_server(lambda line: print(f"  {line}", flush=True))
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"llama-server ready: {path}")


if __name__ == "__main__":
    main()
