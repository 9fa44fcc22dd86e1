"""SmolLM2 through 2 prefill × 2 decode worker processes: 16 concurrent chat requests decode
exactly the tokens of the engine doing it all (batched, as a colocated worker would) and of the
engine serving each request alone."""

from __future__ import annotations

import pytest

from deploy.launcher import WorkerSpec
from engine.loader import load_engine
from engine.sequence import SamplingParams
from tests.workers.conftest import Launch, over_all_pairs, wait_for_idle
from transfer.messages import SamplingSpec

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis briefly.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "What is 12 times 13?",
    "Translate 'good morning' to Spanish.",
    "Name a famous painter.",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
    "What does a CPU do?",
    "Describe a cat in one sentence.",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Suggest a name for a dog.",
    "What is gravity?",
]
MAX_TOKENS = 20
# float32: batch-invariant enough on CPU for greedy equality (see tests/workers/conftest.py).
ARGS = ("--precision", "float32", "--threads", "1", "--num-blocks", "256")


async def test_sixteen_requests_over_two_by_two_workers_equal_the_engine(
    launch: Launch,
) -> None:
    workers = launch(
        [WorkerSpec("prefill", "default", ARGS)] * 2 + [WorkerSpec("decode", "default", ARGS)] * 2
    )
    prefill, decode = workers[:2], workers[2:]
    loaded = load_engine("default", precision="float32", num_blocks=512)
    prompts = [
        loaded.tokenizer.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in QUESTIONS
    ]
    sampling = SamplingSpec(max_tokens=MAX_TOKENS, temperature=0)
    outputs = await over_all_pairs(prefill, decode, prompts, sampling, name="smollm2")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    colocated = loaded.engine.generate(prompts, params)
    alone = [loaded.engine.generate([prompt], params)[0] for prompt in prompts]
    assert outputs == colocated == alone
    answer = loaded.tokenizer.decode(outputs[0], skip_special_tokens=True)
    assert "Paris" in answer
    for worker in workers:
        await wait_for_idle(worker, timeout_s=10)
