"""Generation instances of disaggregated serving (see python_backend_utils/serving/worker_model.py)."""

from python_backend_utils.serving.worker_model import LLMModel


class TritonPythonModel(LLMModel):
    role = "generation"
