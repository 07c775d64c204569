"""`disagg-serve --deployment FILE --set MODEL.KEY=VALUE`: the repository a deployment is served from."""

from __future__ import annotations

import os
import re

import pytest

from launcher.cli import main
from launcher.repository import DEPLOYMENT_FILE, RenderError, Setting, read_config, render_repository
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
    deployment = render_repository(DEFAULT_MODEL_REPOSITORY, target, deployment_file)
    assert deployment.context_servers.num_instances == 3
    assert versions(target / "context") == ["1", "2", "3"]
    assert versions(target / "generation") == ["1", "2"]
    assert (target / "context" / "3" / "model.py").read_text() == (target / "context" / "1" / "model.py").read_text()
    assert not list(target.rglob("__pycache__"))
    assert (target / DEPLOYMENT_FILE).resolve() == deployment_file.resolve()
    assert versions(target / "aggregated") == versions(DEFAULT_MODEL_REPOSITORY / "aggregated")


def test_extra_versions_in_the_source_are_dropped(tmp_path):
    source = tmp_path / "source"
    render_repository(DEFAULT_MODEL_REPOSITORY, source, _file(tmp_path / "three.yaml", 3, 1))
    target = tmp_path / "target"
    render_repository(source, target, _file(tmp_path / "one.yaml", 1, 1))
    assert versions(target / "context") == ["1"]


def test_a_repository_without_version_one_is_refused(tmp_path):
    source = tmp_path / "source"
    render_repository(DEFAULT_MODEL_REPOSITORY, source, _file(tmp_path / "d.yaml", 1, 1))
    os.rename(source / "generation" / "1", source / "generation" / "7")
    with pytest.raises(RenderError, match="generation/1 is missing"):
        render_repository(source, tmp_path / "target", tmp_path / "d.yaml")


def test_cli_reports_a_bad_deployment_file_without_starting_a_server(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("context_servers:\n  num_instances: 1\n  router: {type: fastest}\n")
    assert main(["--deployment", str(bad)]) == 2
    assert "router.type='fastest'" in capsys.readouterr().err


def test_settings_change_parameters_and_instance_counts(tmp_path):
    target = tmp_path / "repo"
    settings = tuple(map(Setting.parse, ["aggregated.cpu_cores=0;1", "aggregated.instance_count=2",
                                         "context.kv_handle_ttl_s=3"]))
    assert render_repository(DEFAULT_MODEL_REPOSITORY, target, settings=settings) is None
    aggregated = read_config(target / "aggregated" / "config.pbtxt")
    assert aggregated.parameters["cpu_cores"].string_value == "0;1"
    assert [group.count for group in aggregated.instance_group] == [2]
    assert read_config(target / "context" / "config.pbtxt").parameters["kv_handle_ttl_s"].string_value == "3"
    source = read_config(DEFAULT_MODEL_REPOSITORY / "aggregated" / "config.pbtxt")
    assert (source.parameters["cpu_cores"].string_value, source.instance_group[0].count) != ("0;1", 2)
    # the rest of the config survives the edit
    assert aggregated.input == source.input and aggregated.model_transaction_policy.decoupled


def test_a_setting_may_hold_quotes_and_backslashes(tmp_path):
    value = 'C:\\models\\"smol"'
    render_repository(DEFAULT_MODEL_REPOSITORY, tmp_path / "repo", settings=(Setting.parse(f"aggregated.model_dir={value}"),))
    assert read_config(tmp_path / "repo" / "aggregated" / "config.pbtxt").parameters["model_dir"].string_value == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("aggregated.cpu_core=0", "aggregated has no parameter 'cpu_core'; it has: block_size, cpu_cores,"),
        ("nonesuch.cpu_cores=0", "there is no model 'nonesuch'"),
        ("aggregated.instance_count=0", "instance_count='0': give a positive integer"),
    ],
)
def test_bad_settings_are_refused_by_name(tmp_path, text, message):
    with pytest.raises(RenderError, match=re.escape(message)):
        render_repository(DEFAULT_MODEL_REPOSITORY, tmp_path / "repo", settings=(Setting.parse(text),))


def test_a_setting_needs_a_model_a_key_and_a_value():
    with pytest.raises(RenderError, match="write MODEL.KEY=VALUE"):
        Setting.parse("cpu_cores=0")


def _file(path, contexts: int, generations: int):
    write_deployment(path, contexts, generations)
    return path


def test_the_two_ensembles_differ_only_in_their_name_and_middle_step():
    """ensemble_aggregated is ensemble with `aggregated` in the middle: one edited without the other
    would serve the baseline with other inputs than what it is compared against."""
    disaggregated = read_config(DEFAULT_MODEL_REPOSITORY / "ensemble" / "config.pbtxt")
    aggregated = read_config(DEFAULT_MODEL_REPOSITORY / "ensemble_aggregated" / "config.pbtxt")
    assert [step.model_name for step in aggregated.ensemble_scheduling.step] == [
        "preprocessing", "aggregated", "postprocessing"]
    aggregated.name = "ensemble"
    aggregated.ensemble_scheduling.step[1].model_name = "disaggregated_serving_bls"
    assert aggregated == disaggregated
