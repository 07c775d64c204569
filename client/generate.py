"""Send one prompt to the ensemble and print the answer (as it is generated, with --stream).

    python -m client.generate --url localhost:8001 --stream "Tell me a story"
    python -m client.generate --protocol http --url localhost:8000 "The capital of France is"

gRPC goes through tritonclient's streaming API, the only gRPC call Triton allows on a decoupled
model (a non-streaming request is a stream with one response). HTTP goes through Triton's
generate extension (/generate, /generate_stream), which accepts decoupled models too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


class GenerateError(RuntimeError):
    """The server answered with an error."""


@dataclass(frozen=True)
class GenerateRequest:
    """The ensemble's inputs; None leaves an input out so the server's default applies."""

    prompt: str
    max_tokens: int = 64
    stream: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    random_seed: int | None = None
    stop_words: list[str] = field(default_factory=list)
    exclude_input_in_output: bool = True

    def arrays(self) -> dict[str, np.ndarray]:
        """The inputs as the numpy arrays tritonclient sends, in TensorRT-LLM's shapes: a batch
        dimension of one in front ([1, 1] for a value, [1, N] for the stop words)."""
        values = {
            "text_input": np.array([[self.prompt.encode("utf-8")]], dtype=np.object_),
            "max_tokens": np.array([[self.max_tokens]], dtype=np.int32),
            "stream": np.array([[self.stream]]),
            "exclude_input_in_output": np.array([[self.exclude_input_in_output]]),
        }
        optional = {
            "temperature": (self.temperature, np.float32),
            "top_k": (self.top_k, np.int32),
            "top_p": (self.top_p, np.float32),
            "random_seed": (self.random_seed, np.uint64),
        }
        for name, (value, dtype) in optional.items():
            if value is not None:
                values[name] = np.array([[value]], dtype=dtype)
        if self.stop_words:
            values["stop_words"] = np.array([[word.encode("utf-8") for word in self.stop_words]], dtype=np.object_)
        return values

    def json_body(self) -> dict:
        """The same inputs as a generate-extension JSON body."""
        body = {}
        for name, array in self.arrays().items():
            values = [v.decode("utf-8") if isinstance(v, bytes) else v.item() for v in array.reshape(-1)]
            body[name] = values if name == "stop_words" else values[0]
        return body


def infer_inputs(arrays: dict[str, np.ndarray], protocol=grpcclient) -> list:
    """tritonclient inputs holding `arrays`; pass `protocol=tritonclient.http` for HTTP ones."""
    inputs = []
    for name, array in arrays.items():
        tensor = protocol.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def generate_grpc(url: str, request: GenerateRequest, model: str = "ensemble",
                  timeout_s: float = 300.0) -> Iterator[str]:
    """Yield text_output of each response until the final one."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    finished = False
    try:
        client.async_stream_infer(model, infer_inputs(request.arrays()), enable_empty_final_response=True)
        while True:
            try:
                result, error = responses.get(timeout=timeout_s)
            except queue.Empty:
                raise GenerateError(f"no response from the server within {timeout_s:.0f} s") from None
            if error is not None:
                raise GenerateError(str(error))
            text = result.as_numpy("text_output")
            if text is not None:
                yield text.reshape(-1)[0].decode("utf-8")
            if result.get_response().parameters["triton_final_response"].bool_param:
                finished = True
                return
    finally:
        client.stop_stream(cancel_requests=not finished)
        client.close()


def generate_http(url: str, request: GenerateRequest, model: str = "ensemble",
                  timeout_s: float = 300.0) -> Iterator[str]:
    """Yield text_output of each response (/generate_stream's server-sent events, or /generate's one answer)."""
    endpoint = "generate_stream" if request.stream else "generate"
    http_request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/{endpoint}",
        data=json.dumps(request.json_body()).encode("utf-8"),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(http_request, timeout=timeout_s) as response:
            if not request.stream:
                yield json.loads(response.read())["text_output"]
                return
            for line in response:
                if line.startswith(b"data: "):
                    event = json.loads(line[len(b"data: ") :])
                    if "error" in event:
                        raise GenerateError(event["error"])
                    yield event["text_output"]
    except urllib.error.HTTPError as error:
        raise GenerateError(json.loads(error.read()).get("error", str(error))) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--url", help="host:port (default localhost:8001 for grpc, localhost:8000 for http)")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, help="0 (the default) is greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="WORD", help="stop word (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    request = GenerateRequest(
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        stream=args.stream,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        random_seed=args.seed,
        stop_words=args.stop,
    )
    generate = generate_grpc if args.protocol == "grpc" else generate_http
    url = args.url or DEFAULT_URLS[args.protocol]
    try:
        for text in generate(url, request, args.model):
            print(text, end="", flush=True)
    except (GenerateError, InferenceServerException, OSError, http.client.HTTPException) as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
