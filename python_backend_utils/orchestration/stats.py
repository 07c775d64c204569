"""What the orchestrator counts, published as `disagg_orchestrator_*` metrics (the planner reads them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OrchestratorStats:
    requests: int = 0
    disaggregated: int = 0
    local_prefill: int = 0  # conditional disaggregation: short prompts
    context_retries: int = 0
    context_fallbacks: int = 0  # every context attempt failed: prefilled on the generation instance
    cancelled: int = 0
    context_phase_seconds: float = 0.0
    generation_phase_seconds: float = 0.0
    output_tokens: int = 0
    input_tokens: int = 0  # prompt tokens received (the planner's ISL)

    def as_metrics(self) -> dict[str, float]:
        return {
            "requests_total": self.requests,
            "disaggregated_total": self.disaggregated,
            "local_prefill_total": self.local_prefill,
            "context_retries_total": self.context_retries,
            "context_fallbacks_total": self.context_fallbacks,
            "cancelled_total": self.cancelled,
            "context_phase_seconds_total": self.context_phase_seconds,
            "generation_phase_seconds_total": self.generation_phase_seconds,
            "output_tokens_total": self.output_tokens,
            "input_tokens_total": self.input_tokens,
        }
