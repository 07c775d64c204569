"""`disagg-perf-analyzer`: tritonclient's perf_analyzer, runnable without hand-made links.

The tritonclient wheel installs the binary next to this interpreter; it needs libb64.so.0d and
libcudart.so.12, which the PyPI Triton runtime ships under hashed names. The first run links them
under their own names in the cache, and every run execs perf_analyzer with them on
LD_LIBRARY_PATH. `--bin-dir` prints a directory holding a `perf_analyzer` that does the same, for
tools that run it by name:

    PATH=$(.venv/bin/disagg-perf-analyzer --bin-dir):$PATH genai-perf profile ...
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from launcher.runtime import pypi_runtime_dir
from python_backend_utils.environment import cache_dir

# Plain name -> the hashed name the runtime's wheel gives it.
LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


class PerfAnalyzerNotFoundError(RuntimeError):
    """No perf_analyzer binary beside this interpreter."""


def binary() -> Path:
    path = Path(sys.executable).parent / "perf_analyzer"
    if not path.is_file():
        raise PerfAnalyzerNotFoundError(f"no perf_analyzer at {path}: it comes with tritonclient[all] (`make setup`)")
    return path


def library_dir() -> Path:
    """A directory with the libraries under the names perf_analyzer asks for, made once."""
    directory = cache_dir() / "perf-analyzer" / "lib"
    directory.mkdir(parents=True, exist_ok=True)
    shipped = pypi_runtime_dir() / "nvidia_pytriton.libs"
    for name, pattern in LIBRARIES.items():
        link = directory / name
        found = sorted(shipped.glob(pattern))
        if found and not link.exists():
            staging = directory / f".{name}.{os.getpid()}"
            staging.unlink(missing_ok=True)
            staging.symlink_to(found[0])
            staging.rename(link)  # atomic: runs side by side agree
    return directory


def environment() -> dict[str, str]:
    env = dict(os.environ)
    dirs = [str(library_dir()), str(pypi_runtime_dir() / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, dirs))
    return env


def bin_dir() -> Path:
    """A directory whose `perf_analyzer` sets the libraries and runs the real one."""
    directory = cache_dir() / "perf-analyzer" / "bin"
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "perf_analyzer"
    text = (f"#!/bin/sh\nLD_LIBRARY_PATH={shlex.quote(environment()['LD_LIBRARY_PATH'])} "
            f"exec {shlex.quote(str(binary()))} \"$@\"\n")
    if not script.is_file() or script.read_text() != text:
        staging = directory / f".perf_analyzer.{os.getpid()}"
        staging.write_text(text)
        staging.chmod(0o755)
        staging.rename(script)
    return directory


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args == ["--bin-dir"]:
            print(bin_dir())
            return 0
        executable = binary()
    except PerfAnalyzerNotFoundError as error:
        print(f"disagg-perf-analyzer: {error}", file=sys.stderr)
        return 2
    os.execve(executable, [str(executable), *args], environment())


if __name__ == "__main__":
    sys.exit(main())
