"""The sampler: greedy, temperature, top-k, top-p and seeds."""

from __future__ import annotations

import torch

from engine.sampler import sample
from engine.sequence import SamplingParams


def _draw(logits: torch.Tensor, params: SamplingParams, draws: int) -> set[int]:
    rows = logits.expand(draws, -1).contiguous()
    return set(sample(rows, [params] * draws, list(range(draws)), [0] * draws))


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 0.0]])
    greedy = SamplingParams(temperature=0)
    assert sample(logits, [greedy, greedy], [1, 2], [0, 0]) == [1, 0]


def test_top_k_limits_candidates() -> None:
    logits = torch.tensor([[4.0, 3.9, 3.8, 3.7, -1.0, -2.0]])
    assert _draw(logits, SamplingParams(temperature=1.0, top_k=2), 200) == {0, 1}


def test_top_p_keeps_the_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    drawn = _draw(probs.log(), SamplingParams(temperature=1.0, top_p=0.7), 300)
    assert drawn == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the third is out


def test_same_seed_and_position_same_token_regardless_of_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    params = [SamplingParams(temperature=1.0, seed=5)] * 4
    batch = sample(logits, params, [5, 6, 7, 8], [3, 3, 3, 3])
    for row in range(4):
        assert sample(logits[row : row + 1], params[:1], [5 + row], [3]) == [batch[row]]
    later = sample(logits, params, [5, 6, 7, 8], [4, 4, 4, 4])
    assert later != batch  # another position draws anew


def test_temperature_spreads_choices() -> None:
    logits = torch.tensor([[1.0, 0.9, 0.8, 0.7]])
    assert len(_draw(logits, SamplingParams(temperature=1.0), 100)) == 4
