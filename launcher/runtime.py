"""Where the tritonserver binary comes from and what it needs to run our Python models.

Two runtimes: a `tritonserver` on PATH (an NGC container), or the server shipped inside the
`nvidia-pytriton` wheel, unpacked with `pip install --no-deps --target` into the cache. The
wheel's Python backend keeps one stub per Python version outside the backend directory, so we
assemble a backend directory of our own that holds the stub for the running interpreter.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from python_backend_utils.environment import cache_dir

PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"


class RuntimeNotFoundError(RuntimeError):
    """Neither a system tritonserver nor the PyPI runtime is installed."""


@dataclass(frozen=True)
class TritonRuntime:
    """A tritonserver binary plus the flags and environment it must be started with."""

    executable: Path
    backend_directory: Path | None  # None: the server's built-in default (NGC container)
    library_dirs: tuple[Path, ...]

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        """`base` with the libraries the server and stubs load, and this interpreter first on PATH.

        The Python stub embeds the interpreter it finds first on PATH, so putting our venv's
        bin there is what makes the stub see our site-packages.
        """
        env = dict(base)
        interpreter_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([interpreter_bin, *filter(None, [base.get("PATH")])])
        libdir = sysconfig.get_config_var("LIBDIR")
        dirs = [str(d) for d in self.library_dirs] + ([libdir] if libdir else [])
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*dirs, *filter(None, [base.get("LD_LIBRARY_PATH")])])
        return env


def pypi_runtime_dir() -> Path:
    return cache_dir() / "pytriton-runtime"


def find_runtime() -> TritonRuntime:
    """Prefer a tritonserver on PATH, else the PyPI runtime in the cache."""
    system = shutil.which("tritonserver")
    if system:
        return TritonRuntime(Path(system), None, ())
    root = pypi_runtime_dir()
    server_root = root / "pytriton" / "tritonserver"
    executable = server_root / "bin" / "tritonserver"
    if not executable.is_file():
        raise RuntimeNotFoundError(
            f"no tritonserver on PATH and none at {executable}: run `make serve`, or "
            f"`pip install --no-deps --target {root} {PYTRITON_REQUIREMENT}`"
        )
    return TritonRuntime(executable, _python_backend_directory(server_root), (root / "nvidia_pytriton.libs",))


def _python_backend_directory(server_root: Path) -> Path:
    """A backend directory whose python/ holds the backend and the stub for this Python version.

    Built once per runtime and Python version, atomically, so servers started side by side share it.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeNotFoundError(f"the PyPI Triton runtime has no Python backend stub for Python {version}")
    target = cache_dir() / "backends" / f"python{version}"
    if (target / "python" / "triton_python_backend_stub").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    python_dir = staging / "python"
    python_dir.mkdir()
    backend = server_root / "backends" / "python"
    for source in (backend / "libtriton_python.so", backend / "triton_python_backend_utils.py", stub):
        shutil.copy2(source, python_dir / source.name)
    try:
        staging.rename(target)
    except OSError:  # another launcher finished first
        shutil.rmtree(staging)
    return target
