"""Detokenize the new tokens of one response, using the tokens before them as context; the
outputs in TensorRT-LLM's [batch, beam, ...] shape, both of one."""

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend_utils.triton_glue.detokenize import decode_increment
from python_backend_utils.triton_glue.io import model_parameters, request_inputs
from python_backend_utils.triton_glue.server_watch import exit_with_server
from python_backend_utils.triton_glue.tokenizer import load_tokenizer


class TritonPythonModel:
    def initialize(self, args):
        exit_with_server()
        self.tokenizer = load_tokenizer(model_parameters(args["model_config"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = request_inputs(request)
            preceding = inputs["PRECEDING_TOKENS"].reshape(-1).tolist()
            text = decode_increment(self.tokenizer, preceding, inputs["TOKENS_BATCH"].reshape(-1).tolist())
            tensors = {
                "OUTPUT": np.array([[text.encode("utf-8")]], dtype=np.object_),
                "OUT_CUM_LOG_PROBS": inputs["CUM_LOG_PROBS"].reshape(1, 1),
                "OUT_OUTPUT_LOG_PROBS": inputs["OUTPUT_LOG_PROBS"].reshape(1, 1, -1),
            }
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()]))
        return responses
