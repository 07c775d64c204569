"""Ending a Triton gRPC stream (`ModelStreamInfer`) without racing the server.

Cancelling a stream just after its final response came races Triton 2.51's stream handler: the
server can then keep the request, and with it the model, forever, so unloading the model and
stopping the server hang until Triton's exit timeout (seen in the scale-out test, and in 3 of 4
runs of 96 streams closed that way; 0 of 5 when each stream was read to its end first). Once
our side of the stream is closed, the server ends the call on its own after the final response:
wait for that, and cancel only a call that does not end.
"""

from __future__ import annotations

import asyncio

import grpc

END_TIMEOUT_S = 5.0


async def end_stream(responses, timeout_s: float = END_TIMEOUT_S) -> None:
    """Read `responses` (a tritonclient.grpc.aio `stream_infer` iterator whose request iterator
    has ended) until the server ends the call; cancel it if that takes over `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            async for _ in responses:
                pass
    except (TimeoutError, grpc.aio.AioRpcError):
        pass
    finally:
        responses.cancel()  # a no-op once the call has ended
