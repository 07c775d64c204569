"""Tokenize text_input; encode stop/bad words in TensorRT-LLM's word-list layout; pass the
sampling settings on, unbatched (the ensemble's inputs come with a batch dimension of one).

Sizes are checked before anything is decoded or tokenized (python_backend_utils/triton_glue/input_limits.py):
a text longer than can fit in the context window is refused at once.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend_utils.context_window import model_config, supported_window
from python_backend_utils.environment import resolve_model_dir
from python_backend_utils.errors import InvalidRequestError
from python_backend_utils.triton_glue.input_limits import (
    MAX_WORD_LIST_IDS,
    PromptTextLimit,
    check_size,
    check_words,
)
from python_backend_utils.triton_glue.io import (
    decode_text,
    encode_word_list,
    model_parameters,
    request_inputs,
    scalar,
)
from python_backend_utils.triton_glue.server_watch import exit_with_server
from python_backend_utils.triton_glue.tokenizer import load_tokenizer, longest_token_bytes

# The ensemble's sampling settings, handed to the middle step as OUT_<name> with the batch dimension dropped.
PASSED_ON = ("REQUEST_OUTPUT_LEN", "STREAMING", "TEMPERATURE", "RUNTIME_TOP_K", "RUNTIME_TOP_P", "RANDOM_SEED",
             "EXCLUDE_INPUT_IN_OUTPUT", "MIN_LENGTH", "RETURN_LOG_PROBS", "PRESENCE_PENALTY", "FREQUENCY_PENALTY",
             "REPETITION_PENALTY", "MIN_P")


class TritonPythonModel:
    def initialize(self, args):
        exit_with_server()
        parameters = model_parameters(args["model_config"])
        self.tokenizer = load_tokenizer(parameters)
        self.end_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        window = supported_window(model_config(resolve_model_dir(parameters.get("model_dir") or None)))
        self.text_limit = PromptTextLimit(window, longest_token_bytes(self.tokenizer))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tensors = self._preprocess(request_inputs(request))
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()]))
            except InvalidRequestError as error:
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
                )
        return responses

    def _preprocess(self, inputs):
        if "QUERY" not in inputs:  # optional in config.pbtxt only so that its absence reaches this error
            raise InvalidRequestError("text_input is required: send the prompt as text")
        raw = inputs["QUERY"].reshape(-1)[0]
        self.text_limit.check(raw)
        # The tokenizer's own special-token rule: a BOS only where the checkpoint adds one.
        input_ids = self.tokenizer.encode(decode_text(raw, "text_input"))
        passed_on = {f"OUT_{name}": inputs[name].reshape(-1) for name in PASSED_ON if name in inputs}
        return {
            **passed_on,
            "INPUT_ID": np.asarray(input_ids, dtype=np.int32),
            "REQUEST_INPUT_LEN": np.asarray([len(input_ids)], dtype=np.int32),
            "STOP_WORDS_IDS": self._word_list(inputs.get("STOP_WORDS_DICT"), "stop_words"),
            "BAD_WORDS_IDS": self._word_list(inputs.get("BAD_WORDS_DICT"), "bad_words"),
            "OUT_END_ID": np.asarray([scalar(inputs, "END_ID", self.end_id)], dtype=np.int32),
            "OUT_PAD_ID": np.asarray([scalar(inputs, "PAD_ID", self.pad_id)], dtype=np.int32),
        }

    def _word_list(self, words, name):
        raw = [] if words is None else list(words.reshape(-1))
        check_words(raw, name)
        ids = [self.tokenizer.encode(decode_text(word, name), add_special_tokens=False) for word in raw]
        check_size(name, sum(len(word) for word in ids), MAX_WORD_LIST_IDS, "token ids")
        return encode_word_list(ids)
