"""`disagg-serve --deployment FILE`: the rendered repository has one version per instance."""

from __future__ import annotations

import os

import pytest

from launcher.cli import main
from launcher.repository import DEPLOYMENT_FILE, RenderError, render_repository
from launcher.server import DEFAULT_MODEL_REPOSITORY


def versions(model_dir) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if p.is_dir())


def write_deployment(path, contexts: int, generations: int) -> None:
    path.write_text(
        f"context_servers:\n  num_instances: {contexts}\n  router: {{type: round_robin}}\n"
        f"generation_servers:\n  num_instances: {generations}\n"
    )


def test_instances_become_versions_and_the_deployment_is_linked(tmp_path):
    deployment_file = tmp_path / "deploy.yaml"
    write_deployment(deployment_file, contexts=3, generations=2)
    target = tmp_path / "repo"
    deployment = render_repository(DEFAULT_MODEL_REPOSITORY, deployment_file, target)
    assert deployment.context_servers.num_instances == 3
    assert versions(target / "context") == ["1", "2", "3"]
    assert versions(target / "generation") == ["1", "2"]
    assert (target / "context" / "3" / "model.py").read_text() == (target / "context" / "1" / "model.py").read_text()
    assert not list(target.rglob("__pycache__"))
    assert (target / DEPLOYMENT_FILE).resolve() == deployment_file.resolve()
    assert versions(target / "aggregated") == versions(DEFAULT_MODEL_REPOSITORY / "aggregated")


def test_extra_versions_in_the_source_are_dropped(tmp_path):
    source = tmp_path / "source"
    render_repository(DEFAULT_MODEL_REPOSITORY, _file(tmp_path / "three.yaml", 3, 1), source)
    target = tmp_path / "target"
    render_repository(source, _file(tmp_path / "one.yaml", 1, 1), target)
    assert versions(target / "context") == ["1"]


def test_a_repository_without_version_one_is_refused(tmp_path):
    source = tmp_path / "source"
    render_repository(DEFAULT_MODEL_REPOSITORY, _file(tmp_path / "d.yaml", 1, 1), source)
    os.rename(source / "generation" / "1", source / "generation" / "7")
    with pytest.raises(RenderError, match="generation/1 is missing"):
        render_repository(source, tmp_path / "d.yaml", tmp_path / "target")


def test_cli_reports_a_bad_deployment_file_without_starting_a_server(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("context_servers:\n  num_instances: 1\n  router: {type: fastest}\n")
    assert main(["--deployment", str(bad)]) == 2
    assert "router.type='fastest'" in capsys.readouterr().err


def _file(path, contexts: int, generations: int):
    write_deployment(path, contexts, generations)
    return path
