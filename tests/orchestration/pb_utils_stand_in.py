"""A stand-in for `triton_python_backend_utils`, which only the Python-backend stub provides: the part
the orchestrator uses, with the instances it calls through BLS played by Python functions.

An instance is a function of the request (`BlsRequest`) that yields its responses; it runs on the
orchestrator's BLS thread, as a real instance's response iterator is read there, so it may block.
"""

from __future__ import annotations

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
