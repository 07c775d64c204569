"""Exceptions the engine raises; the Triton glue turns each into an error response."""


class InvalidRequestError(ValueError):
    """The request itself is wrong (a value out of range, a prompt too long); the client must change it."""


class CapacityError(RuntimeError):
    """The request can never fit this instance (more KV blocks than the pool holds)."""


class RequestAbortedError(RuntimeError):
    """The request was cancelled or its KV could not be obtained."""


# Triton 2.51's Python backend resets the code of every error a BLS call receives to INTERNAL
# (triton-inference-server/server#7804), so a worker's INVALID_ARG would reach the orchestrator
# as a failure to retry elsewhere. Errors the client must fix therefore also say so in their message.
CLIENT_ERROR_PREFIX = "invalid request: "


def client_error_message(message: str) -> str:
    return message if message.startswith(CLIENT_ERROR_PREFIX) else CLIENT_ERROR_PREFIX + message


def is_client_error_message(message: str) -> bool:
    return message.startswith(CLIENT_ERROR_PREFIX)


# The same for UNAVAILABLE (a refusal under load: the client should retry later), so a BLS caller
# of the ensemble (ensemble_unary) can restore the code. The ensemble puts "in ensemble 'NAME', "
# before a step's message.
UNAVAILABLE_PREFIX = "unavailable: "


def is_unavailable_message(message: str) -> bool:
    return message.startswith(UNAVAILABLE_PREFIX) or f", {UNAVAILABLE_PREFIX}" in message


class EngineDeadError(RuntimeError):
    """The instance's engine loop stopped: it takes no request until the instance is restarted."""
