"""The sampler: greedy, temperature, top-k, top-p and seeds; tiny temperatures and non-finite
logits."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import sample
from engine.sequence import MIN_SAMPLING_TEMPERATURE, SamplingParams


def _draw(logits: torch.Tensor, params: SamplingParams, draws: int) -> set[int | None]:
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


@pytest.mark.parametrize("temperature", [5e-324, 1e-45, 1e-39, 1e-38, 1e-20, 9.9e-6])
def test_a_temperature_below_the_minimum_is_greedy(temperature: float) -> None:
    """1e-39 and below once divided the logits into infinities and NaN, which failed the
    whole step (issue 16); every temperature under the minimum is now exactly greedy."""
    torch.manual_seed(0)
    logits = torch.randn(3, 1000) * 20
    params = [SamplingParams(temperature=temperature, top_p=0.9, top_k=50, seed=3)] * 3
    assert params[0].is_greedy
    assert sample(logits, params, [3, 3, 3], [0, 1, 2]) == logits.argmax(dim=-1).tolist()


def test_the_minimum_temperature_itself_samples() -> None:
    assert not SamplingParams(temperature=MIN_SAMPLING_TEMPERATURE).is_greedy
    tied = torch.zeros(1, 8)  # all logits equal: sampling spreads, greedy would not
    assert len(_draw(tied, SamplingParams(temperature=MIN_SAMPLING_TEMPERATURE), 100)) > 1


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1e-39])
def test_a_temperature_that_is_not_a_finite_non_negative_number_is_refused(
    temperature: float,
) -> None:
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        SamplingParams(temperature=temperature)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_row_with_non_finite_logits_samples_nothing_and_the_others_are_unchanged(
    temperature: float,
) -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, 300)
    logits[1, 7] = float("nan")
    logits[2, 0] = float("inf")
    logits[4] = float("-inf")  # no finite logit at all
    params = [SamplingParams(temperature=temperature, seed=row) for row in range(5)]
    seeds, positions = list(range(5)), [2] * 5
    tokens = sample(logits, params, seeds, positions)
    assert tokens[1] is None and tokens[2] is None and tokens[4] is None
    for row in (0, 3):  # as if sampled alone
        alone = sample(logits[row : row + 1], params[row : row + 1], seeds[row : row + 1], [2])
        assert tokens[row] == alone[0] is not None


def test_any_integer_seed_samples_reproducibly_and_apart_from_the_others() -> None:
    """Seeds anywhere in int64 and beyond, negative included, each draw the same tokens again
    and tokens of their own. Before, seeds 2**63 - 1 apart drew alike (0 and 2**63 - 1, -1 and
    -2**63), and so did seeds 2**32 apart, since torch's CPU generator keeps 32 bits."""
    torch.manual_seed(2)
    logits = torch.randn(1, 50_000)
    params = [SamplingParams(temperature=1.0)]
    seeds = [0, 1, -1, 2**32 - 1, 2**32 + 1, 2**63 - 1, -(2**63), 2**64 - 1, -(2**70)]
    draws = {seed: [sample(logits, params, [seed], [n])[0] for n in range(6)] for seed in seeds}
    for seed, tokens in draws.items():
        assert tokens == [sample(logits, params, [seed], [n])[0] for n in range(6)]
    assert len({tuple(tokens) for tokens in draws.values()}) == len(seeds)
