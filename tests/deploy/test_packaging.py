"""`pip install .` (not editable) gives a disagg-serve that finds its model repository and data.

Installed into a fresh venv under tmp, offline: the dependencies (and the build backend) are
this venv's, reached through a .pth file, so only the package itself is built and installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from launcher.cli import MODES
from tests.helpers import REPO_ROOT

PROBE = """
import json
from launcher.server import DEFAULT_MODEL_REPOSITORY
from planner.validate import DEFAULT_CALIBRATION
print(json.dumps({"repository": str(DEFAULT_MODEL_REPOSITORY), "calibration": str(DEFAULT_CALIBRATION)}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the working tree's files (as a clone has them) pip-installed, not editable."""
    root = tmp_path_factory.mktemp("packaging")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, check=True,
                           capture_output=True, timeout=60).stdout.decode().split("\0")
    source = root / "src"
    for name in filter(None, files):
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO_ROOT / name).read_bytes())
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    [site_packages] = (venv / "lib").glob("python*/site-packages")
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", str(source)], cwd=root, check=True, timeout=600)
    return venv


def test_pip_install_then_disagg_serve_help(installed, tmp_path):
    shown = subprocess.run([str(installed / "bin" / "disagg-serve"), "--help"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "--served-model-name" in shown.stdout and "validate-simulator" in shown.stdout


def test_the_installed_launcher_finds_the_model_repository_and_the_planners_data(installed, tmp_path):
    probe = subprocess.run([str(installed / "bin" / "python"), "-c", PROBE], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    found = {name: Path(path) for name, path in json.loads(probe.stdout).items()}
    assert found["repository"].is_relative_to(installed), "the source tree's repository, not the installed one"
    for model in MODES["both"] + ["preprocessing", "postprocessing", "disaggregated_serving_bls"]:
        assert (found["repository"] / model / "config.pbtxt").is_file(), model
        assert (found["repository"] / model / "1").is_dir(), model
    assert (found["repository"] / "disaggregated_serving_bls" / "disagg_config.yaml").is_file()
    assert (found["repository"] / "aggregated" / "1" / "model.py").is_file()
    assert found["calibration"].is_file()
