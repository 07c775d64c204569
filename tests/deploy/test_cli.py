"""disagg-serve's command line: its commands and options, without starting a server."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import COMMANDS, parse_args
from launcher.runtime import TritonRuntime
from launcher.server import TritonServer


def disagg_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands_and_the_serving_options():
    shown = disagg_serve("--help")
    assert shown.returncode == 0, shown.stderr
    for word in (*COMMANDS, "--served-model-name", "--api-key", "--host", "--version"):
        assert word in shown.stdout


def test_version_is_the_packages():
    shown = disagg_serve("--version")
    assert shown.returncode == 0 and shown.stdout.strip() == f"disagg-serve {importlib.metadata.version('triton-disagg')}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_parses_its_own_options(command):
    shown = disagg_serve(command, "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage:") and "--served-model-name" not in shown.stdout


def test_an_unknown_command_is_refused_by_name():
    shown = disagg_serve("serve-everything")
    assert shown.returncode == 2 and "serve-everything" in shown.stderr


def test_serving_options_reach_the_server_and_the_frontend(monkeypatch):
    monkeypatch.setenv("TRITON_DISAGG_API_KEY", "from-the-environment")
    args = parse_args(["--host", "127.0.0.1", "--served-model-name", "my-model"])
    assert (args.host, args.served_model_name, args.api_key) == ("127.0.0.1", "my-model", "from-the-environment")
    assert parse_args(["--api-key", "given"]).api_key == "given"
    server = TritonServer(Path("/repo"), host=args.host, http_port=1, grpc_port=2, metrics_port=3)
    command = server.command(TritonRuntime(Path("/rt/tritonserver"), None, ()), "prefix_")
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"} <= set(command)
    assert server.urls.grpc == "127.0.0.1:2"
    assert TritonServer(Path("/repo"), grpc_port=2).urls.grpc == "localhost:2"
