"""The ``fairgate`` command line.

Subcommands import what they need when they run, so ``fairgate --help`` and the torch-free ones
start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]

MODEL_HELP = "default (SmolLM2-135M-Instruct, pulled on first use), tiny, or a path"


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="default", help=f"model: {MODEL_HELP} (default: %(default)s)"
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: %(default)s)"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: fp32 on CPU with bf16 copies for batched products where the CPU has AMX, "
        "bf16 on CUDA (default: %(default)s)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairgate",
        description="fairgate: a multi-tenant LLM gateway in front of disaggregated "
        "prefill/decode workers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = commands.add_parser("model", help="manage model files")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    pull = model_commands.add_parser(
        "pull", help="fetch the default model (SmolLM2-135M-Instruct GGUF) into the cache"
    )
    pull.add_argument("--force", action="store_true", help="fetch again even if cached")
    model_commands.add_parser("path", help="print where the default model is cached")

    generate = commands.add_parser(
        "generate", help="apply the chat template to PROMPT and print the completion"
    )
    generate.add_argument("prompt", help="the user message")
    _add_model_argument(generate)
    generate.add_argument("--max-tokens", type=int, default=256, help="default: %(default)s")
    generate.add_argument(
        "--temperature", type=float, default=0.7, help="0 is greedy (default: %(default)s)"
    )
    generate.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s")
    generate.add_argument("--top-k", type=int, default=0, help="0: off (default: %(default)s)")
    generate.add_argument("--seed", type=int, default=None, help="sampling seed")
    generate.add_argument("--system", default=None, help="an optional system message")

    bench = commands.add_parser("bench", help="benchmarks; each prints one JSON line last")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="NAME")
    bench_engine = bench_commands.add_parser(
        "engine", help="prefill and decode throughput against transformers, same run"
    )
    _add_model_argument(bench_engine)
    bench_engine.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    bench_engine.add_argument(
        "--output", default=None, help="also write the JSON result to this file"
    )
    return parser


def _run_model(args: argparse.Namespace) -> int:
    from engine.model_store import default_model_path, pull_default_model

    if args.model_command == "pull":
        print(pull_default_model(force=args.force))
    else:
        print(default_model_path())
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from engine.loader import load_engine
    from engine.sequence import SamplingParams

    loaded = load_engine(args.model, device=args.device, precision=args.precision)
    messages = []
    if args.system is not None:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    prompt_ids = loaded.tokenizer.encode_chat(messages, add_generation_prompt=True)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    [output_ids] = loaded.engine.generate([prompt_ids], params)
    print(loaded.tokenizer.decode(output_ids, skip_special_tokens=True).strip())
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from bench.engine_bench import run_engine_bench

    return run_engine_bench(
        model=args.model,
        device=args.device,
        precision=args.precision,
        quick=args.quick,
        output=args.output,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from engine.config import ModelLoadError

    handlers = {"model": _run_model, "generate": _run_generate, "bench": _run_bench}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError, ModelLoadError) as exc:
        print(f"fairgate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
