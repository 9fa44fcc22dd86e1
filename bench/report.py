"""How every benchmark ends: one JSON object as the last stdout line, progress on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["log", "print_result"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_result(result: dict[str, Any], output: str | None) -> None:
    """Print ``result`` as the last stdout line, and write it to ``output`` too when given."""
    line = json.dumps(result, sort_keys=True)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(line + "\n")
    print(line)
