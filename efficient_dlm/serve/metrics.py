"""The server's Prometheus metrics (prometheus_client, one registry per engine so tests stay independent).

Tokens per forward is exported as its two counters (generated tokens, row forwards: forward passes a
request took part in) and their running ratio, the figure every dLM speed claim rests on.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineMetrics:
    def __init__(self, slots: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("edlm_requests", "requests finished, by reason", ["reason"], registry=r)
        self.rejected = Counter("edlm_requests_rejected", "requests refused because the queue was full", registry=r)
        self.generated = Counter("edlm_generated_tokens", "tokens generated", registry=r)
        self.row_forwards = Counter("edlm_row_forwards", "forward passes, counted once per request taking part", registry=r)
        self.calls = Counter("edlm_step_calls", "calls of the compiled step program", registry=r)
        self.tokens_per_forward = Gauge("edlm_tokens_per_forward", "generated tokens / row forwards since start", registry=r)
        self.queue_depth = Gauge("edlm_queue_depth", "requests waiting for a slot", registry=r)
        self.occupancy = Gauge("edlm_slot_occupancy", "slots holding a request", registry=r)
        self.draft_proposed = Counter("edlm_draft_tokens_proposed", "speculative: draft tokens offered to the verifier",
                                      registry=r)
        self.draft_accepted = Counter("edlm_draft_tokens_accepted", "speculative: draft tokens the verifier accepted",
                                      registry=r)
        self.slots = Gauge("edlm_slots", "slots of the engine", registry=r)
        self.slots.set(slots)
        self.latency = Histogram("edlm_request_latency_seconds", "arrival to last token", buckets=_LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("edlm_time_to_first_token_seconds", "arrival to first token", buckets=_LATENCY_BUCKETS,
                                     registry=r)

    def step(self, occupied: int, row_forwards: int) -> None:
        self.calls.inc()
        self.row_forwards.inc(row_forwards)
        self.tokens_per_forward.set(self.generated._value.get() / max(self.row_forwards._value.get(), 1.0))

    def drafted(self, proposed: int, accepted: int) -> None:
        self.draft_proposed.inc(proposed)
        self.draft_accepted.inc(accepted)

    def finished(self, reason: str, seconds: float | None = None) -> None:
        self.requests.labels(reason=reason).inc()
        if seconds is not None:
            self.latency.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
