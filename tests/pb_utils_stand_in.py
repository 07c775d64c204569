"""A stand-in for `triton_python_backend_utils`, which only the Python-backend stub provides (tests/conftest.py
installs it): the part our models use, the objects the stub hands to `execute` (`ClientRequest`, `Sender`),
custom metrics that keep their values, and the instances a BLS model calls played by Python functions.

An instance is a function of the request (`InferenceRequest`) that yields its responses; it runs on the
orchestrator's BLS thread, as a real instance's response iterator is read there, so it may block.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonError(Exception):
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        super().__init__(message)
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class Tensor:
    def __init__(self, name: str, array) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None) -> None:
        self._tensors, self._error = output_tensors or [], error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def output_tensors(self) -> list[Tensor]:
        return self._tensors


Instance = Callable[["InferenceRequest"], Iterator[InferenceResponse]]
# The instances on "this server", by (model name, version): the tests fill it.
instances: dict[tuple[str, int], Instance] = {}


class InferenceRequest:
    def __init__(self, model_name: str, model_version: int, inputs: list[Tensor], requested_output_names: list[str],
                 request_id: str) -> None:
        self.model_name, self.model_version, self.request_id = model_name, model_version, request_id
        self.inputs = {tensor.name(): tensor.as_numpy() for tensor in inputs}
        self.requested_output_names = requested_output_names

    async def async_exec(self, decoupled: bool) -> Iterator[InferenceResponse]:
        assert decoupled
        return iter(instances[(self.model_name, self.model_version)](self))


class Logger:
    """The backend's log, to Python's logging here."""

    @staticmethod
    def log_info(message: str) -> None:
        logging.getLogger("triton").info(message)

    @staticmethod
    def log_warn(message: str) -> None:
        logging.getLogger("triton").warning(message)

    @staticmethod
    def log_error(message: str) -> None:
        logging.getLogger("triton").error(message)


class MetricFamily:
    GAUGE, COUNTER, HISTOGRAM = range(3)
    # Every family made, by name: what a scrape of the metrics port would show.
    families: dict[str, MetricFamily] = {}

    def __init__(self, name: str, description: str, kind: int) -> None:
        self.name, self.description, self.kind = name, description, kind
        self.metrics: list[Metric] = []
        MetricFamily.families[name] = self

    def Metric(self, labels: dict[str, str]) -> Metric:  # noqa: N802 - the backend's name
        metric = Metric(labels)
        self.metrics.append(metric)
        return metric


class Metric:
    def __init__(self, labels: dict[str, str]) -> None:
        self.labels, self.value = labels, 0.0

    def set(self, value: float) -> None:
        self.value = value

    def increment(self, amount: float) -> None:
        self.value += amount


class Sender:
    """A response sender: keeps what was sent; `done` is set by the final flag."""

    def __init__(self) -> None:
        self.responses: list[tuple[InferenceResponse | None, int]] = []
        self.done = threading.Event()
        self.cancelled = threading.Event()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        assert not self.done.is_set(), "a response after the final one"
        self.responses.append((response, flags))
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    def outputs(self, name: str) -> list:
        """Every value of output `name` across the responses, in order."""
        return [value for response, _ in self.responses if response is not None and not response.has_error()
                for tensor in response.output_tensors() if tensor.name() == name
                for value in tensor.as_numpy().reshape(-1).tolist()]

    def tokens(self) -> list[int]:
        return self.outputs("output_ids")

    def error(self) -> TritonError | None:
        response, flags = self.responses[-1]
        assert flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL, "the request never got its final response"
        return response.error() if response is not None else None


class ClientRequest:
    """A request as `execute` gets it: its inputs, its id, its sender; cancelled as a client cancels."""

    def __init__(self, inputs: dict[str, np.ndarray], request_id: str = "", cancel_after_tokens: int | None = None):
        self._inputs, self._id = inputs, request_id
        self.sender = Sender()
        self._cancel_after = cancel_after_tokens

    def inputs(self) -> list[Tensor]:
        return [Tensor(name, array) for name, array in self._inputs.items()]

    def request_id(self) -> str:
        return self._id

    def get_response_sender(self) -> Sender:
        return self.sender

    def is_cancelled(self) -> bool:
        return self.sender.is_cancelled() or (self._cancel_after is not None
                                              and len(self.sender.tokens()) >= self._cancel_after)
