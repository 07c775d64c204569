"""Answer a unary infer with the single response of the decoupled `ensemble` run with stream=false.

`execute` hands each request to a worker thread and returns at once; the worker runs the
ensemble through BLS and answers through the request's response sender, so concurrent
requests share the engine's batch instead of queueing behind each other here.

The ensemble's responses come through a blocking iterator that 2.51 cannot interrupt, so it is
read on a thread of its own and the worker waits at most `request_timeout_s` for it: past that
the client gets UNAVAILABLE, and the read ends when the ensemble does (the orchestrator's own
timeouts bound that).
"""

import json
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as WaitTimeout

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend_utils.errors import is_client_error_message, is_unavailable_message
from python_backend_utils.triton_glue.server_watch import exit_with_server

ENSEMBLE = "ensemble"
OUTPUTS = ["text_output", "cum_log_probs", "output_log_probs"]
# More than the engine batches at once (its max_num_seqs); further requests wait for a worker.
MAX_CONCURRENT_REQUESTS = 64
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Above the orchestrator's default phase timeouts (60 s to the first token, then 600 s between tokens).
DEFAULT_REQUEST_TIMEOUT_S = 900.0


def error_response(message, code=None):
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=error)


class TritonPythonModel:
    def initialize(self, args):
        exit_with_server()
        parameters = json.loads(args["model_config"]).get("parameters", {})
        text = parameters.get("request_timeout_s", {}).get("string_value", "").strip()
        self.timeout_s = float(text) if text else DEFAULT_REQUEST_TIMEOUT_S
        if not self.timeout_s > 0:
            raise ValueError(f"request_timeout_s of {ENSEMBLE}_unary must be above 0, got {text!r}")
        self.workers = ThreadPoolExecutor(MAX_CONCURRENT_REQUESTS, thread_name_prefix="unary")
        self.readers = ThreadPoolExecutor(MAX_CONCURRENT_REQUESTS, thread_name_prefix="unary-read")

    def execute(self, requests):
        for request in requests:
            self.workers.submit(self._answer, request)
        return None

    def _answer(self, request):
        sender = request.get_response_sender()
        try:
            response = self.readers.submit(self._run_ensemble, request).result(timeout=self.timeout_s)
        except WaitTimeout:
            response = error_response(f"{ENSEMBLE} sent no answer within {self.timeout_s:g} s "
                                      f"(request_timeout_s of {ENSEMBLE}_unary); retry later",
                                      pb_utils.TritonError.UNAVAILABLE)
        except Exception as error:  # noqa: BLE001 - the client gets an answer whatever went wrong
            response = error_response(f"running {ENSEMBLE} failed: {error}")
        sender.send(response, flags=FINAL)

    def _run_ensemble(self, request):
        stream = pb_utils.get_input_tensor_by_name(request, "stream")
        if stream is not None and stream.as_numpy().any():
            message = (f"this model sends one response; to stream, call `{ENSEMBLE}` "
                       "(gRPC streaming or /generate_stream)")
            return error_response(message, pb_utils.TritonError.INVALID_ARG)
        inputs = [tensor for tensor in request.inputs() if tensor.name() != "stream"]
        inputs.append(pb_utils.Tensor("stream", np.array([[False]])))  # batched, as every input
        inner = pb_utils.InferenceRequest(model_name=ENSEMBLE, inputs=inputs, requested_output_names=OUTPUTS)
        for response in list(inner.exec(decoupled=True)):
            if response.has_error():
                return error_response(response.error().message(), self._code(response.error()))
            if response.output_tensors():
                return pb_utils.InferenceResponse(output_tensors=response.output_tensors())
        return error_response(f"{ENSEMBLE} ended without a response")

    @staticmethod
    def _code(error):
        """2.51 hands every BLS error over as INTERNAL (server#7804): the message says which it was."""
        if is_client_error_message(error.message()):
            return pb_utils.TritonError.INVALID_ARG
        if is_unavailable_message(error.message()):
            return pb_utils.TritonError.UNAVAILABLE
        return error.code()

    def finalize(self):
        self.workers.shutdown(wait=True)
        self.readers.shutdown(wait=False)  # a read of a hung ensemble must not hold up the unload
