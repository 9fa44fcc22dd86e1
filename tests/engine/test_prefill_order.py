"""The prompt-chunk order (``engine.preemption.prefill_order``): inside a tenant and class the
shortest aged remaining prompt goes first (PecSched), a long prompt is passed during at most as
many steps as it takes alone, and class rank and the tenants' counters decide as before. The
engine tests run the real engine loop on the null runner, one step at a time."""

from __future__ import annotations

import math

import pytest

from engine.engine import EngineConfig, LLMEngine
from engine.null_engine import NullEngineConfig, create_null_engine
from engine.preemption import PrefillCandidate, aged_remaining_tokens, prefill_order
from engine.sequence import Priority, SamplingParams

STEP_TOKENS = 512  # each step's prompt-token budget in these tests (no time cap: not measured)
CONFIG = EngineConfig(max_num_batched_tokens=STEP_TOKENS, prefill_chunk_size=STEP_TOKENS)
PARAMS = SamplingParams(max_tokens=2, seed=1, ignore_eos=True)
TENANT_A = b"tenant-a"
TENANT_B = b"tenant-b"
TENANT_C = b"tenant-c"


def _engine(config: EngineConfig = CONFIG) -> LLMEngine:
    return create_null_engine(NullEngineConfig(num_blocks=4096), config, sleep=lambda s: None)


class _Steps:
    """Steps an engine of prefill-only requests and records, per request, the step of its
    first prompt chunk and of its first token (its prefill's end)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.step = 0
        self.arrived: dict[str, int] = {}
        self.first_chunk: dict[str, int] = {}
        self.first_token: dict[str, int] = {}

    def add(self, request_id: str, num_tokens: int, tenant: bytes, priority: Priority) -> None:
        """A prompt of one token repeated, a different one per request: no prefix-cache hits."""
        self.arrived[request_id] = self.step
        prompt = [1 + len(self.arrived)] * num_tokens
        self.engine.add_request(
            request_id, prompt, PARAMS, salt=tenant, priority=priority, prefill_only=True
        )

    def run(self) -> None:
        """One step."""
        outputs = self.engine.step()
        for seq in self.engine.sequences.values():
            if seq.num_prefill_chunks and seq.request_id not in self.first_chunk:
                self.first_chunk[seq.request_id] = self.step
        for output in outputs:
            self.first_token.setdefault(output.request_id, self.step)
            if output.is_handed_off:
                self.engine.release_handed_off(output.request_id)
        self.step += 1


# ---- the function --------------------------------------------------------------------------


def _candidate(
    tenant: bytes,
    counter: float,
    num_remaining_tokens: int,
    *,
    rank: int = 0,
    num_waited_steps: int = 0,
    arrival_order: int = 0,
) -> PrefillCandidate:
    return PrefillCandidate(
        tenant=tenant,
        rank=rank,
        counter=counter,
        arrival=counter,  # later placed, later arrived
        num_remaining_tokens=num_remaining_tokens,
        num_waited_steps=num_waited_steps,
        arrival_order=arrival_order,
    )


def test_each_tenant_keeps_its_places_and_fills_them_shortest_first() -> None:
    candidates = [
        _candidate(TENANT_A, 0.0, 4000, num_waited_steps=2, arrival_order=0),
        _candidate(TENANT_B, 1.0, 900, arrival_order=1),
        _candidate(TENANT_A, 2.0, 32, arrival_order=2),
        _candidate(TENANT_B, 3.0, 40, arrival_order=3),
        _candidate(TENANT_A, 4.0, 32, arrival_order=4),
    ]
    # By importance alone: 0, 1, 2, 3, 4. Tenant A keeps places 0, 2, 4 and B places 1, 3;
    # each fills them with its shortest prompts first (equal lengths: the earlier arrival).
    assert prefill_order(candidates, STEP_TOKENS) == [2, 3, 4, 1, 0]
    # Aged long enough, the long prompt takes its tenant's first place back.
    aged = [*candidates]
    aged[0] = _candidate(TENANT_A, 0.0, 4000, num_waited_steps=8, arrival_order=0)
    assert aged_remaining_tokens(4000, 8, STEP_TOKENS) == -96
    assert prefill_order(aged, STEP_TOKENS) == [0, 3, 2, 1, 4]


def test_rank_goes_before_length_even_within_a_tenant() -> None:
    candidates = [
        _candidate(TENANT_A, 0.0, 4000, rank=1),
        _candidate(TENANT_A, 1.0, 16, rank=0, arrival_order=1),
    ]
    assert prefill_order(candidates, STEP_TOKENS) == [0, 1]
    with pytest.raises(ValueError, match="step_tokens"):
        prefill_order(candidates, 0)


# ---- the engine ----------------------------------------------------------------------------


def test_a_short_prompt_of_the_same_tenant_goes_between_a_long_ones_chunks() -> None:
    """The issue's case: a tenant's long prompt, then its short ones, whose counters are higher
    (the gateway charged the long prompt before placing them) and arrivals later."""
    steps = _Steps(_engine())
    steps.add("long", 4000, TENANT_A, Priority(counter=10.0, arrival=0.0))
    steps.run()
    steps.run()
    for index in range(4):
        steps.add(f"short-{index}", 32, TENANT_A, Priority(counter=4010.0 + index, arrival=0.8))
    while "long" not in steps.first_token and steps.step < 20:
        steps.run()
    assert [steps.first_token[f"short-{index}"] for index in range(4)] == [2, 2, 2, 2]
    # 4000 tokens in 512-token steps take 8 steps alone (0-7); the short ones took 128 tokens.
    assert steps.first_token["long"] == 8


def test_admission_takes_the_short_prompt_first() -> None:
    """One batch slot, both waiting: the short prompt is admitted first."""
    steps = _Steps(_engine(EngineConfig(max_num_batched_tokens=512, max_num_seqs=1)))
    steps.add("long", 2000, TENANT_A, Priority(counter=0.0, arrival=0.0))
    steps.add("short", 32, TENANT_A, Priority(counter=2000.0, arrival=0.1))
    while "long" not in steps.first_token and steps.step < 20:
        steps.run()
    assert steps.first_token["short"] == 0
    assert steps.first_chunk["long"] == 1


def test_a_long_prompt_is_not_starved_by_a_stream_of_short_ones() -> None:
    """Two 300-token prompts of its tenant and class arrive every step: more than a step
    computes. Those arriving ``ceil(R₀ / B)`` steps or more after the long prompt (``R₀`` its
    tokens, ``B`` a step's budget) never get a chunk before its prefill is done, so it ends
    within the steps its own tokens and those of the prompts that arrived earlier take."""
    num_long_tokens, num_short_tokens = 2000, 300
    steps = _Steps(_engine())
    steps.add("long", num_long_tokens, TENANT_A, Priority(counter=0.0, arrival=0.0))
    counter = float(num_long_tokens)
    while "long" not in steps.first_token and steps.step < 40:
        steps.run()
        for index in range(2):
            steps.add(
                f"short-{steps.step}-{index}", num_short_tokens, TENANT_A, Priority(counter=counter)
            )
            counter += num_short_tokens
    assert "long" in steps.first_token, "starved"
    bound_steps = math.ceil(num_long_tokens / STEP_TOKENS)
    done = steps.first_token["long"]
    late = [r for r, step in steps.arrived.items() if r != "long" and step >= bound_steps]
    assert late and all(steps.first_chunk.get(r, done) >= done for r in late)
    early = [r for r, step in steps.arrived.items() if r != "long" and step < bound_steps]
    # Short ones did go ahead of it, and it ended by the step at which its own tokens and the
    # early ones' are computed (steps 0 .. done).
    assert any(steps.first_token.get(r, done) < done for r in early)
    assert done + 1 <= math.ceil((num_long_tokens + num_short_tokens * len(early)) / STEP_TOKENS)


def test_class_rank_and_other_tenants_counters_still_decide() -> None:
    steps = _Steps(_engine())
    steps.add("long", 2000, TENANT_A, Priority(rank=1, counter=10.0, arrival=0.0))
    steps.run()
    steps.add("lower-class", 32, TENANT_A, Priority(rank=0, counter=0.0, arrival=1.0))
    steps.add("higher-counter", 32, TENANT_B, Priority(rank=1, counter=20.0, arrival=1.0))
    steps.add("lower-counter", 32, TENANT_C, Priority(rank=1, counter=5.0, arrival=1.0))
    while len(steps.first_token) < 4 and steps.step < 20:
        steps.run()
    long = steps.first_token["long"]
    assert steps.first_token["lower-counter"] == 1 < long
    assert steps.first_chunk["higher-counter"] >= long
    assert steps.first_chunk["lower-class"] >= long
