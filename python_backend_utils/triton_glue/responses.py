"""Sending responses from a Python-backend model: shared by the worker models and the orchestrator."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend_utils.errors import (
    CapacityError,
    InvalidRequestError,
    RequestAbortedError,
    client_error_message,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def error_response(error: Exception) -> pb_utils.InferenceResponse:
    """INVALID_ARG for what the client must change, CANCELLED for aborts, INTERNAL for the rest."""
    if isinstance(error, (InvalidRequestError, CapacityError)):
        code = pb_utils.TritonError.INVALID_ARG
    elif isinstance(error, RequestAbortedError):
        code = pb_utils.TritonError.CANCELLED
    else:
        code = pb_utils.TritonError.INTERNAL
    message = str(error) or f"{type(error).__name__} (no detail)"  # never an empty error for the client
    if code == pb_utils.TritonError.INVALID_ARG:
        message = client_error_message(message)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def send_tensors(sender, tensors: dict[str, np.ndarray], final: bool) -> None:
    response = pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in tensors.items()]) if tensors else None
    sender.send(response, flags=FINAL if final else 0)
