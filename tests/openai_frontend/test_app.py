"""The HTTP layer without a tritonserver: what is answered before any generation starts."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from launcher.ports import free_ports
from openai_frontend.app import create_app
from openai_frontend.served_model import ServedModel
from openai_frontend.triton_client import TritonGenerator
from python_backend_utils.environment import DEFAULT_MODEL_NAME, default_model_dir

CHAT = {"model": DEFAULT_MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}


def client_for(model_dir) -> TestClient:
    [unused_port] = free_ports(1)  # nothing listens: the Triton server is "not ready"
    return TestClient(create_app(ServedModel.load(model_dir), TritonGenerator(f"localhost:{unused_port}", "m")))


@pytest.fixture(scope="module")
def client():
    with client_for(default_model_dir()) as client:
        yield client


def test_models_and_health_while_triton_is_down(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == DEFAULT_MODEL_NAME
    assert client.get("/health").status_code == 503


def test_a_request_while_not_ready_is_a_503_with_the_error_body(client):
    response = client.post("/v1/completions", json={"model": DEFAULT_MODEL_NAME, "prompt": "x"})
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"


def test_an_unknown_model_is_a_404_and_bad_json_a_400(client):
    response = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = client.post("/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_checkpoint_without_a_chat_template_refuses_chat_with_a_400(tmp_path):
    checkpoint = tmp_path / "no-template"
    shutil.copytree(default_model_dir(), checkpoint, ignore=shutil.ignore_patterns("model.safetensors", "*.jinja"))
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    with client_for(checkpoint) as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "model": "no-template"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "no_chat_template"
