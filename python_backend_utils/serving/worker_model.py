"""The Triton model behind `aggregated`, `context` and `generation`: one implementation, three roles.

Like TensorRT-LLM's tensorrt_llm model, what a request gets depends on what it carries:
- role "aggregated": prefill and decode here;
- role "context": prefill and the first token here; the KV is published through kv_transfer
  and the response carries `context_phase_params` for a generation instance;
- role "generation": with `context_phase_params`, the KV is pulled while other sequences keep
  decoding; without, both phases run here (conditional disaggregation, or the fallback).
  The params are signed by the context role and verified here, under the deployment key
  (context_params.py), before anything in them is used.
A request with `stop` set aborts the in-flight request of the same Triton request id.

`execute` only validates and enqueues; the engine loop thread sends every response. Should that
thread die, its requests fail, `execute` refuses new ones and the stub exits so that the
orchestrator reloads the instance (stub_recovery.py).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend_utils.engine.config import ConfigError, EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.loop import EngineLoop
from python_backend_utils.engine.outputs import RequestOutput
from python_backend_utils.engine.sampling_params import check_token_ids
from python_backend_utils.engine.sequence import RequestType
from python_backend_utils.serving.context_params import (
    ContextPhaseParams,
    MalformedContextParamsError,
    load_deployment_key,
)
from python_backend_utils.serving.placement import pin_instance, threads_for
from python_backend_utils.triton_glue.detailed_metrics import detailed_metrics, published
from python_backend_utils.triton_glue.io import (
    ResponseAssembler,
    generation_request,
    model_parameters,
    prompt_log_prob_tensors,
    request_inputs,
    top_log_prob_tensors,
)
from python_backend_utils.triton_glue.metric_names import ENGINE_METRICS, PARAMS_METRICS, TRANSFER_METRICS
from python_backend_utils.triton_glue.metrics import MetricSet
from python_backend_utils.triton_glue.responses import FINAL, error_response, send_tensors
from python_backend_utils.triton_glue.server_watch import exit_with_server
from python_backend_utils.triton_glue.stub_recovery import exit_stub


class ResponseStream:
    """One request's responses, sent from the engine loop thread."""

    def __init__(self, sender, assembler: ResponseAssembler, on_end=None) -> None:
        self.sender = sender
        self.assembler = assembler
        self.on_end = on_end

    def on_output(self, output: RequestOutput) -> None:
        response = self.assembler.add(output.token_ids, output.log_probs, output.finished, output.top_log_probs,
                                      output.prompt_log_probs)
        if response is not None:
            send_tensors(self.sender, response.tensors, response.final)
        if output.finished and self.on_end:
            self.on_end()

    def on_error(self, error: Exception) -> None:
        self.sender.send(error_response(error), flags=FINAL)
        if self.on_end:
            self.on_end()


class LLMModel:
    """Subclassed by each model.py, which only names its role."""

    role = "aggregated"

    def initialize(self, args) -> None:
        cores = pin_instance(args)  # first: the engine's threads start on their own cores
        exit_with_server()
        parameters = model_parameters(args["model_config"])
        self.instance_name = f"{args['model_name']}/{args['model_version']}"
        config = EngineConfig.from_parameters(parameters)
        if not parameters.get("num_threads"):
            config = dataclasses.replace(config, num_threads=threads_for(cores))
        pb_utils.Logger.log_info(f"{self.instance_name}: {config.describe()}, "
                                 f"{'cores ' + ','.join(map(str, sorted(cores))) if cores else 'unpinned'}")
        self.kv_exchange = None
        self.params_key = b""
        self.params_rejected = 0
        if self.role == "aggregated":
            engine = LLMEngine(config, cores=cores)
        elif config.world_size > 1:
            raise ConfigError(f"{self.role}: tensor_parallel_size={config.tensor_parallel_size}, "
                              f"pipeline_parallel_size={config.pipeline_parallel_size}: a parallel engine does not "
                              "publish or pull each rank's KV yet: split `aggregated`, keep 1 here")
        else:
            self.params_key = load_deployment_key(parameters)  # before the engine: fail fast without one
            from python_backend_utils.serving.kv_exchange import KVExchange, transfer_config

            self.kv_exchange = KVExchange(transfer_config(parameters, f"{self.instance_name}@{os.getpid()}",
                                                       key=self.params_key))
            engine = LLMEngine(config, allocate_pool=self.kv_exchange.allocate_pool)
            self.kv_exchange.attach(engine.pool.tensor)
        self.engine = engine
        labels = {"model": args["model_name"], "version": args["model_version"]}
        descriptions = {**ENGINE_METRICS, **(TRANSFER_METRICS if self.kv_exchange else {}),
                        **(PARAMS_METRICS if self.role == "generation" else {})}
        self.gauges = MetricSet("disagg", published(descriptions, detailed_metrics(parameters)), labels)
        self.loop = EngineLoop(engine, on_tick=self._publish_metrics, on_death=exit_stub)
        self.loop.start()
        self._by_triton_id: dict[str, str] = {}  # Triton request id -> engine request id, for `stop`
        self._ids_lock = threading.Lock()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._enqueue(request, sender)
            except Exception as error:  # noqa: BLE001 - bad input gets an error, the model keeps serving
                sender.send(error_response(error), flags=FINAL)
        return None

    def finalize(self) -> None:
        """Tear down while the stub can still take it: stop the loop, close the transfer agent,
        then drop and collect everything.

        Left to the interpreter's exit, the engine, the agent and the gauges sit in reference
        cycles (the loop calls back into this model; a published request's responder holds its
        response sender) that only Py_FinalizeEx collects, after the stub has unmapped its shared
        memory: the senders' destructors then crash the stub (issue 21). Metric families and
        gauges are never destroyed (metrics.py says why). Calling it twice is harmless."""
        if self.loop is not None:
            self.loop.stop()
        if self.engine is not None:
            self.engine.close()
        if self.kv_exchange is not None:
            self.kv_exchange.close()
        self.loop = self.kv_exchange = self.engine = self.gauges = None
        gc.collect()

    def _publish_metrics(self) -> None:
        stats = self.engine.stats()
        values = {
            "kv_blocks_total": stats.num_blocks,
            "kv_blocks_free": stats.num_free_blocks,
            "kv_blocks_used": stats.num_blocks - stats.num_free_blocks,
            "sequences_running": stats.num_running,
            "sequences_waiting": stats.num_waiting,
            "sequences_awaiting_kv": stats.num_awaiting_kv,
            "sequences_kv_held": stats.num_kv_held,
            "preemptions_total": stats.preemptions,
            "kv_pull_fallbacks_total": stats.kv_pull_fallbacks,
            "prefix_cache_hit_tokens_total": stats.prefix_cache_hit_tokens,
            "context_params_rejected_total": self.params_rejected,
        }
        if self.kv_exchange is not None:
            t = self.kv_exchange.metrics()
            values.update({
                "kv_bytes_received_total": t["bytes_received"],  # shared-memory reads included
                "kv_bytes_sent_total": t["bytes_sent"],
                "kv_pulls_completed_total": t["pulls_completed"],
                "kv_pulls_failed_total": t["pulls_failed"],
                "kv_pulls_in_flight": t["pulls_in_flight"],
                "kv_pulls_refused_total": t["pulls_refused"],
                "kv_unauthenticated_messages_total": t["unauthenticated_messages"],
                "kv_handles_expired_total": t["handles_expired"],
                "kv_handles_abandoned_total": t["handles_abandoned"],
                "kv_pinned_blocks": t["pinned_blocks"],
                "kv_pull_seconds_total": t["pull_duration_s"]["sum"],
            })
        self.gauges.publish(values)

    def _enqueue(self, request, sender) -> None:
        inputs = request_inputs(request)
        triton_id = request.request_id()
        if "stop" in inputs and bool(inputs["stop"].reshape(-1)[0]):
            self._stop(triton_id)
            sender.send(None, flags=FINAL)
            return
        generation = generation_request(inputs)
        check_token_ids(generation.prompt_ids, self.engine.vocab_size, "input_ids")
        request_id = uuid.uuid4().hex
        on_end = None
        if triton_id:
            with self._ids_lock:
                self._by_triton_id[triton_id] = request_id
            on_end = lambda: self._forget(triton_id, request_id)  # noqa: E731
        if self.role == "context":
            responder = ContextResponder(sender, self.kv_exchange, self.loop, self.instance_name, on_end,
                                         self.params_key, generation.prompt_ids, generation.params.top_logprobs)
            self.loop.submit(request_id, generation.prompt_ids, generation.params, responder.on_output,
                             sender.is_cancelled, responder.on_error, request_type=RequestType.CONTEXT_ONLY)
            return
        stream = ResponseStream(sender, ResponseAssembler(generation), on_end)
        if self.role == "generation" and "context_phase_params" in inputs:
            try:
                handoff = ContextPhaseParams.from_bytes(inputs["context_phase_params"].reshape(-1).tobytes(),
                                                        self.params_key, generation.prompt_ids)
            except MalformedContextParamsError:
                self.params_rejected += 1
                raise
            check_token_ids([handoff.first_token], self.engine.vocab_size, "context_phase_params' first token")
            start_pull = self.kv_exchange.pull_starter(handoff)
            self.loop.submit_generation(request_id, generation.prompt_ids, handoff.first_token, generation.params,
                                        start_pull, stream.on_output, sender.is_cancelled, stream.on_error)
            return
        self.loop.submit(request_id, generation.prompt_ids, generation.params, stream.on_output,
                         sender.is_cancelled, stream.on_error)

    def _stop(self, triton_id: str) -> None:
        with self._ids_lock:
            request_id = self._by_triton_id.pop(triton_id, None)
        if request_id is None:
            return
        self.loop.stop_request(request_id, f"request {triton_id} was stopped")
        if self.kv_exchange is not None:
            self.kv_exchange.revoke(request_id)

    def _forget(self, triton_id: str, request_id: str) -> None:
        with self._ids_lock:
            if self._by_triton_id.get(triton_id) == request_id:
                del self._by_triton_id[triton_id]


class ContextResponder:
    """Context role: answer with the first token and, while the request goes on, the KV's handle."""

    def __init__(self, sender, kv_exchange, loop: EngineLoop, instance_name: str, on_end,
                 params_key: bytes, prompt_ids: list[int], top_logprobs: int) -> None:
        self.sender = sender
        self.kv_exchange = kv_exchange
        self.loop = loop
        self.instance_name = instance_name
        self.on_end = on_end
        self.params_key = params_key
        self.prompt_ids = prompt_ids
        self.top_logprobs = top_logprobs

    def on_output(self, output: RequestOutput) -> None:
        tensors = {
            "output_ids": np.asarray(output.token_ids, dtype=np.int32),
            "output_log_probs": np.asarray(output.log_probs, dtype=np.float32),
            **top_log_prob_tensors(output.top_log_probs, self.top_logprobs),
            **prompt_log_prob_tensors(output.prompt_log_probs, self.top_logprobs),
        }
        published = output.kv_block_ids is not None
        if published:
            handle = self.kv_exchange.publish(output.request_id, output.kv_block_ids, output.num_prompt_tokens,
                                           on_release=self._released)
            params = ContextPhaseParams(self.instance_name, output.token_ids[0], output.num_prompt_tokens, handle)
            signed = params.to_bytes(self.params_key, self.prompt_ids)
            tensors["context_phase_params"] = np.frombuffer(signed, dtype=np.uint8)
        send_tensors(self.sender, tensors, final=True)
        if self.on_end and not published:
            self.on_end()

    def _released(self, request_id: str) -> None:
        """The KV was pulled, revoked or expired. Until then a `stop` with this request's id
        still finds it, so an orchestrator that gives up on the request frees it at once."""
        engine = self.loop.engine
        self.loop.call_soon(lambda: engine.release_kv(request_id))
        if self.on_end:
            self.on_end()

    def on_error(self, error: Exception) -> None:
        self.sender.send(error_response(error), flags=FINAL)
        if self.on_end:
            self.on_end()
