"""The tiny random model's weights, shared by the engine-loop tests."""

from __future__ import annotations

import pytest
import torch

from engine.tiny import tiny_config, tiny_state_dict
from tests.engine.tiny_engines import VOCAB_SIZE


@pytest.fixture(scope="session")
def weights() -> dict[str, torch.Tensor]:
    return tiny_state_dict(tiny_config(VOCAB_SIZE), seed=0)
