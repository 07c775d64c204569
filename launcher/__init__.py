"""Run tritonserver on this project's model repository: `disagg-serve`, or `TritonServer` from Python."""

from launcher.server import ServerStartError, ServerUrls, TritonServer

__all__ = ["ServerStartError", "ServerUrls", "TritonServer"]
