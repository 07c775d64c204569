"""Tokenize text_input; encode stop/bad words in TensorRT-LLM's word-list layout."""

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend_utils.errors import InvalidRequestError
from python_backend_utils.serving.tokenizer import load_tokenizer
from python_backend_utils.serving.triton_io import (
    decode_text,
    encode_word_list,
    model_parameters,
    request_inputs,
    scalar,
)


class TritonPythonModel:
    def initialize(self, args):
        self.tokenizer = load_tokenizer(model_parameters(args["model_config"]))
        self.end_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id

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
        text = decode_text(inputs["QUERY"].reshape(-1)[0], "text_input")
        # The tokenizer's own special-token rule: a BOS only where the checkpoint adds one.
        input_ids = self.tokenizer.encode(text)
        return {
            "INPUT_ID": np.asarray(input_ids, dtype=np.int32),
            "REQUEST_INPUT_LEN": np.asarray([len(input_ids)], dtype=np.int32),
            "STOP_WORDS_IDS": self._word_list(inputs.get("STOP_WORDS_DICT"), "stop_words"),
            "BAD_WORDS_IDS": self._word_list(inputs.get("BAD_WORDS_DICT"), "bad_words"),
            "OUT_END_ID": np.asarray([scalar(inputs, "END_ID", self.end_id)], dtype=np.int32),
            "OUT_PAD_ID": np.asarray([scalar(inputs, "PAD_ID", self.pad_id)], dtype=np.int32),
        }

    def _word_list(self, words, name):
        texts = [] if words is None else [decode_text(word, name) for word in words.reshape(-1)]
        return encode_word_list([self.tokenizer.encode(text, add_special_tokens=False) for text in texts])
