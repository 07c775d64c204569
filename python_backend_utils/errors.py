"""Exceptions the engine raises; the Triton glue turns each into an error response."""


class InvalidRequestError(ValueError):
    """The request itself is wrong (a value out of range, a prompt too long); the client must change it."""


class CapacityError(RuntimeError):
    """The request can never fit this instance (more KV blocks than the pool holds)."""


class RequestAbortedError(RuntimeError):
    """The request was cancelled or its KV could not be obtained."""


class EngineDeadError(RuntimeError):
    """The instance's engine loop stopped: it takes no request until the instance is restarted."""
