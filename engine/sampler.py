"""Token sampling: greedy, temperature, top-k, top-p, with a per-request seed.

Randomness for a request's n-th output token comes from a generator seeded with (seed, n), so the
draw does not depend on which other requests share the batch, on which worker the token is sampled
(prefill or decode), or on whether the request was preempted and recomputed in between. Any
integer seed works, negative ones and ones beyond 64 bits included: (seed, n) is hashed into the
generator's seed.

A row whose logits are not all finite (the model overflowed on that request) samples nothing:
its token is None and the engine fails that request alone. Temperatures below
``MIN_SAMPLING_TEMPERATURE`` are greedy (``SamplingParams.is_greedy``), so dividing finite logits
by the temperature stays finite.
"""

from __future__ import annotations

import hashlib

import torch

from engine.sequence import SamplingParams

__all__ = ["sample"]

_PERSON = b"fairgate.sample"  # BLAKE2b personalization of the position seeds


def _position_seed(seed: int, output_position: int) -> int:
    """The generator seed for a request's token at ``output_position``: a 64-bit hash of both.
    A hash, not arithmetic: torch's CPU generator keeps only the low 32 bits of its seed, so a
    linear mix made seeds 2**32 apart (-1 and 2**32 - 1, say) draw the same tokens everywhere,
    and one modulo 2**63 - 1 did the same for seeds that far apart."""
    digest = hashlib.blake2b(
        f"{seed}:{output_position}".encode(), digest_size=8, person=_PERSON
    ).digest()
    return int.from_bytes(digest, "little")


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [vocab] outside the top-k and the top-p nucleus with -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_ids = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already cover top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, sorted_ids, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,  # [num_seqs, vocab_size] fp32
    params: list[SamplingParams],
    seeds: list[int],
    output_positions: list[int],
) -> list[int | None]:
    """Pick one token per row; row i follows ``params[i]`` with ``seeds[i]`` at output position
    ``output_positions[i]`` (how many tokens the request has generated before this one). None
    for a row whose logits are not all finite."""
    is_finite = torch.isfinite(logits).all(dim=-1)
    # One transfer from the device for both: the greedy token, or -1 for a row that has none.
    greedy_ids: list[int] = torch.where(is_finite, torch.argmax(logits, dim=-1), -1).tolist()
    token_ids: list[int | None] = [None if t < 0 else t for t in greedy_ids]
    generator: torch.Generator | None = None
    for row, p in enumerate(params):
        if p.is_greedy or token_ids[row] is None:
            continue
        if generator is None:  # all-greedy steps (the common case) never build one
            generator = torch.Generator(device=logits.device)
        row_logits = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row_logits, dim=-1)
        generator.manual_seed(_position_seed(seeds[row], output_positions[row]))
        token_ids[row] = int(torch.multinomial(probs, 1, generator=generator).item())
    return token_ids
