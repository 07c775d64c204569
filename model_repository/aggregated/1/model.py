"""Aggregated serving: prefill and decode in one engine with in-flight batching (the baseline)."""

from python_backend_utils.serving.worker_model import LLMModel


class TritonPythonModel(LLMModel):
    role = "aggregated"
