"""Runners over the tiny random model, small enough to build one per test."""

from __future__ import annotations

import torch

from engine.runner import ModelRunner
from engine.tiny import tiny_config

VOCAB_SIZE = 512
BLOCK_SIZE = 4


def tiny_runner(weights: dict[str, torch.Tensor], *, num_blocks: int) -> ModelRunner:
    return ModelRunner(
        tiny_config(VOCAB_SIZE), weights, num_blocks=num_blocks, block_size=BLOCK_SIZE
    )
