"""Answer a unary infer with the single response of the decoupled `ensemble` run with stream=false.

`execute` hands each request to a worker thread and returns at once; the worker runs the
ensemble through BLS and answers through the request's response sender, so concurrent
requests share the engine's batch instead of queueing behind each other here.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

ENSEMBLE = "ensemble"
OUTPUTS = ["text_output", "cum_log_probs", "output_log_probs"]
# More than the engine batches at once (its max_num_seqs); further requests wait for a worker.
MAX_CONCURRENT_REQUESTS = 64
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def error_response(message, code=None):
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=error)


class TritonPythonModel:
    def initialize(self, args):
        self.workers = ThreadPoolExecutor(MAX_CONCURRENT_REQUESTS, thread_name_prefix="unary")

    def execute(self, requests):
        for request in requests:
            self.workers.submit(self._answer, request)
        return None

    def _answer(self, request):
        sender = request.get_response_sender()
        try:
            response = self._run_ensemble(request)
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
        inputs.append(pb_utils.Tensor("stream", np.array([False])))
        inner = pb_utils.InferenceRequest(model_name=ENSEMBLE, inputs=inputs, requested_output_names=OUTPUTS)
        for response in list(inner.exec(decoupled=True)):
            if response.has_error():
                error = response.error()
                return error_response(error.message(), error.code())
            if response.output_tensors():
                return pb_utils.InferenceResponse(output_tensors=response.output_tensors())
        return error_response(f"{ENSEMBLE} ended without a response")

    def finalize(self):
        self.workers.shutdown(wait=True)
