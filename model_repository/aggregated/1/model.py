"""Aggregated serving: prefill and decode in one engine with in-flight batching.

`execute` only validates and enqueues. The engine runs on its loop thread, which sends each
request's responses through the response sender saved here; the loop aborts requests whose
client cancelled (their KV blocks are freed at once). Only a direct caller's cancellation
arrives here: Triton 2.51 does not pass an ensemble request's cancellation on to a step
that is already running.
"""

from __future__ import annotations  # pb_utils classes appear only once the stub has started

import uuid

import triton_python_backend_utils as pb_utils

from python_backend_utils.config import EngineConfig
from python_backend_utils.engine import LLMEngine
from python_backend_utils.engine_loop import EngineLoop
from python_backend_utils.errors import CapacityError, InvalidRequestError, RequestAbortedError
from python_backend_utils.triton_io import ResponseAssembler, generation_request, model_parameters, request_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def error_response(error: Exception) -> pb_utils.InferenceResponse:
    if isinstance(error, (InvalidRequestError, CapacityError)):
        code = pb_utils.TritonError.INVALID_ARG
    elif isinstance(error, RequestAbortedError):
        code = pb_utils.TritonError.CANCELLED
    else:
        code = pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), code))


class ResponseStream:
    """One request's responses, sent from the engine loop thread."""

    def __init__(self, sender, assembler: ResponseAssembler) -> None:
        self.sender = sender
        self.assembler = assembler

    def on_output(self, output) -> None:
        response = self.assembler.add(output)
        if response is None:
            return
        tensors = [pb_utils.Tensor(name, value) for name, value in response.tensors.items()]
        flags = FINAL if response.final else 0
        self.sender.send(pb_utils.InferenceResponse(tensors) if tensors else None, flags=flags)

    def on_error(self, error: Exception) -> None:
        self.sender.send(error_response(error), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args):
        config = EngineConfig.from_parameters(model_parameters(args["model_config"]))
        self.loop = EngineLoop(LLMEngine(config))
        self.loop.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                generation = generation_request(request_inputs(request))
                stream = ResponseStream(sender, ResponseAssembler(generation))
                self.loop.submit(
                    uuid.uuid4().hex,
                    generation.prompt_ids,
                    generation.params,
                    on_output=stream.on_output,
                    is_cancelled=sender.is_cancelled,
                    on_error=stream.on_error,
                )
            except InvalidRequestError as error:
                sender.send(error_response(error), flags=FINAL)
        return None

    def finalize(self):
        self.loop.stop()
