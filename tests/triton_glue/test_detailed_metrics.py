"""The metrics that reveal other clients' prompts are off unless a model's config turns them on."""

from __future__ import annotations

import re

import pytest

from launcher.server import DEFAULT_MODEL_REPOSITORY
from python_backend_utils.triton_glue.detailed_metrics import detailed_metrics, published

DESCRIPTIONS = {
    "kv_blocks_used": "KV blocks held",
    "prefix_cache_hit_tokens_total": "prompt tokens reused from the prefix cache",
    "disagg_router_in_flight": "requests in flight per instance",
    "disagg_router_decisions_total": "requests routed to each instance",
}


def pbtxt_parameters(model: str) -> dict[str, str]:
    """The string parameters of a shipped config.pbtxt."""
    text = (DEFAULT_MODEL_REPOSITORY / model / "config.pbtxt").read_text()
    return dict(re.findall(r'parameters \{ key: "([^"]+)", value: \{ string_value: "([^"]*)" \} \}', text))


def test_prefix_hits_and_router_decisions_are_published_only_when_asked_for():
    assert set(published(DESCRIPTIONS, detailed_metrics({}))) == {"kv_blocks_used", "disagg_router_in_flight"}
    assert published(DESCRIPTIONS, detailed_metrics({"detailed_metrics": "true"})) == DESCRIPTIONS
    assert detailed_metrics({"detailed_metrics": ""}) is False and detailed_metrics({"detailed_metrics": "FALSE"}) is False


@pytest.mark.parametrize("model", ["aggregated", "context", "generation", "disaggregated_serving_bls"])
def test_shipped_models_keep_them_off_and_let_a_setting_turn_them_on(model):
    parameters = pbtxt_parameters(model)
    assert "detailed_metrics" in parameters, f"{model}: `--set {model}.detailed_metrics=true` needs the parameter"
    assert detailed_metrics(parameters) is False


def test_a_bad_value_names_the_parameter():
    with pytest.raises(ValueError, match="detailed_metrics='ture': use true or false"):
        detailed_metrics({"detailed_metrics": "ture"})
