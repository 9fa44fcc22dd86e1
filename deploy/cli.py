"""The ``fairgate`` command line.

Subcommands import what they need when they run, so ``fairgate --help`` and the torch-free ones
start fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.launcher import exit_when_stdin_closes

if TYPE_CHECKING:
    from engine.serving import WorkerService
    from transfer.messages import WorkerRole
    from transfer.registration import Registration
    from transfer.telemetry import LogFormat

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
        help="auto: on CPU, each kind of product (batch-1 decode, batched decode, prefill, "
        "the output projection's included) in fp32 or bf16, whichever was faster when timed "
        "at load, once per host; attention and the KV cache in bf16 only with AMX-BF16; bf16 "
        "on CUDA (default: %(default)s)",
    )


POLICY_HELP = (
    "scheduling policy: fcfs, vtc, dlpm, d2lpm, rr_lpm, or auto (the default: d2lpm with several "
    "prefill workers, else dlpm)"
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

    generate.add_argument(
        "--disaggregated",
        action="store_true",
        help="start one prefill and one decode worker process (KV over gloo on CPU), run the "
        "request through them, print the completion and stop them",
    )

    prefill_worker = commands.add_parser(
        "prefill-worker",
        help="serve prefills: first token at once, KV shipped to a decode worker",
        description="A prefill worker: POST /v1/prefill computes a prompt (chunked, reusing the "
        "tenant-scoped prefix cache), answers with the first token and ships the KV to the "
        "decode worker that reserved blocks for it. Also /healthz, /readyz, /v1/info, /v1/load, "
        "/v1/abort.",
    )
    _add_worker_arguments(prefill_worker, default_port=8101)
    decode_worker = commands.add_parser(
        "decode-worker",
        help="serve decodes: reserve KV blocks, receive KV, stream tokens",
        description="A decode worker: POST /v1/decode reserves KV blocks (or answers 503 "
        "no_room), receives the prompt's KV from a prefill worker on --kv-port and streams the "
        "tokens. With --colocated it also serves whole requests on POST /v1/generate. Also "
        "/healthz, /readyz, /v1/info, /v1/load, /v1/abort.",
    )
    _add_worker_arguments(decode_worker, default_port=8201)
    decode_worker.add_argument(
        "--kv-port",
        type=int,
        default=8202,
        help="port of the KV store prefill workers pair through; 0 picks one (default: "
        "%(default)s)",
    )
    decode_worker.add_argument(
        "--kv-wait-timeout",
        type=float,
        default=120.0,
        help="seconds a reservation waits for its KV (default: %(default)s)",
    )
    decode_worker.add_argument(
        "--colocated",
        action="store_true",
        help="also prefill: serve whole requests on /v1/generate (no transfer)",
    )
    decode_worker.add_argument(
        "--preemption",
        choices=("recompute", "swap"),
        default="recompute",
        help="how a preempted request gives its KV blocks up: recompute hands it back to the "
        "caller (a Preempted frame; it is re-prefilled elsewhere), swap parks its KV in host "
        "memory and resumes it here (default: %(default)s)",
    )
    decode_worker.add_argument(
        "--swap-space-gb",
        type=float,
        default=None,
        help="GiB of host memory for swapped-out KV with --preemption swap (default: 1, or as "
        "much as the device KV cache if that is smaller)",
    )

    gateway = commands.add_parser(
        "gateway",
        help="serve the OpenAI-compatible and admin APIs in front of running workers",
        description="The gateway: authenticates tenants, enforces quotas, queues requests and "
        "places them on the workers given by --prefill/--decode (or --colocated). Settings come "
        "from --config (TOML), then FAIRGATE_<SECTION>_<FIELD> variables, then these flags. The "
        "admin token comes from the config or FAIRGATE_GATEWAY_ADMIN_TOKEN, never a flag.",
    )
    gateway.add_argument("--config", default=None, help="a TOML configuration file")
    gateway.add_argument("--host", default=None, help="bind address (default: 127.0.0.1)")
    gateway.add_argument("--port", type=int, default=None, help="0 picks one (default: 8000)")
    gateway.add_argument(
        "--prefill",
        action="append",
        default=None,
        metavar="URL",
        help="a prefill worker (repeatable)",
    )
    gateway.add_argument(
        "--decode",
        action="append",
        default=None,
        metavar="URL",
        help="a decode worker (repeatable)",
    )
    gateway.add_argument(
        "--colocated",
        action="append",
        default=None,
        metavar="URL",
        help="a colocated worker (decode-worker --colocated; repeatable)",
    )
    gateway.add_argument("--store", default=None, help="SQLite file (default: fairgate.db)")
    gateway.add_argument(
        "--model",
        default=None,
        help=f"the gateway's own model: its tokenizer, and the unit of cost factors: {MODEL_HELP}",
    )
    gateway.add_argument("--policy", default=None, help=POLICY_HELP)
    gateway.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logs go to stderr (default: %(default)s)",
    )
    gateway.add_argument(
        "--log-format",
        default=None,
        choices=["text", "json"],
        help="json: one object per line, the request log's fields included "
        "(default: telemetry.log_format, text)",
    )
    gateway.add_argument(
        "--exit-with-parent", action="store_true", help="shut down when standard input closes"
    )

    up = commands.add_parser(
        "up",
        help="start the whole stack here: workers and gateway, with a demo tenant",
        description="Start prefill and decode workers and the gateway as child processes, wait "
        "until all are ready, create a demo tenant and key on first start and write them, with "
        "the admin token, to STATE_DIR/credentials.json (mode 0600; the secrets are printed "
        "nowhere), then print the URL, where the credentials are and a curl that reads the key "
        "from there. A worker that exits is restarted at the same ports after a backoff (0.5 s, "
        "doubling to 10 s) while the others serve; the stack stops, with status 1 and the "
        "reason, when the gateway exits or a worker exits more than --max-restarts times within "
        "--restart-window seconds. Ctrl-C or SIGTERM stops every child.",
    )
    up.add_argument(
        "--engine",
        default="default",
        help=f"the workers' model: {MODEL_HELP}, or null (default: %(default)s)",
    )
    up.add_argument(
        "--models",
        default="",
        help="several models, comma-separated (e.g. default,tiny), each with its own pool of "
        "--prefill-workers and --decode-workers; the first is the reference model of the cost "
        "factors. Instead of --engine",
    )
    up.add_argument(
        "--prefill-workers", type=int, default=1, help="per model (default: %(default)s)"
    )
    up.add_argument(
        "--decode-workers", type=int, default=1, help="per model (default: %(default)s)"
    )
    up.add_argument("--port", type=int, default=8000, help="gateway port (default: %(default)s)")
    up.add_argument(
        "--host", default="127.0.0.1", help="gateway bind address (default: %(default)s)"
    )
    up.add_argument(
        "--state-dir",
        default=None,
        help="store and credentials (default: $FAIRGATE_HOME/stack, ~/.cache/fairgate/stack)",
    )
    up.add_argument("--policy", default=None, help=POLICY_HELP)
    up.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: this machine's cores shared among the workers, "
        "at least 1 each)",
    )
    from deploy.supervisor import RestartPolicy

    restarts = RestartPolicy()
    up.add_argument(
        "--max-restarts",
        type=int,
        default=restarts.max_restarts,
        metavar="N",
        help="restarts of one worker allowed within --restart-window; one more exit is a crash "
        "loop and stops the stack; 0: any worker exit stops it (default: %(default)s)",
    )
    up.add_argument(
        "--restart-window",
        type=float,
        default=restarts.window_s,
        metavar="SECONDS",
        help="the window --max-restarts counts in (default: %(default)g)",
    )

    from deploy.admin_cli import add_admin_parser

    add_admin_parser(commands)

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
    bench_transfer = bench_commands.add_parser(
        "transfer",
        help="KV transfer throughput against a plain send/recv, and TTFT disaggregated vs "
        "colocated, same run",
    )
    bench_transfer.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    bench_transfer.add_argument(
        "--output", default=None, help="also write the JSON result to this file"
    )
    bench_gateway = bench_commands.add_parser(
        "gateway",
        help="sustained requests per second through the gateway (null engine), and the latency "
        "it adds over calling the workers directly, same run",
    )
    bench_gateway.add_argument("--quick", action="store_true", help="shorter windows")
    gateway_modes = bench_gateway.add_mutually_exclusive_group()
    gateway_modes.add_argument(
        "--tracing",
        action="store_true",
        help="also a second stack that traces every request (OTLP to a local receiver), side "
        "by side: the cost of tracing on the gateway's overhead",
    )
    gateway_modes.add_argument(
        "--redis",
        action="store_true",
        help="also a second stack whose gateway keeps its quotas and fair counters in Redis "
        "(a server of its own, deploy/redis.sh), side by side: the cost of replica state",
    )
    gateway_modes.add_argument(
        "--overload",
        nargs="?",
        const="1.5,3",
        default=None,
        metavar="FACTORS",
        help="instead: after rps_max, an open loop at each factor times it (comma-separated; "
        "default %(const)s), one tenant and then with a second steady one: completed "
        "requests/s against rps_max, fast 429/503 refusals against client timeouts",
    )
    gateway_modes.add_argument(
        "--prompt-flood",
        action="store_true",
        help="instead: a tenant's small requests' latency with and without another sending "
        "huge prompts as fast as it can (5 MB, and just under the context-length bound)",
    )
    bench_gateway.add_argument(
        "--client-timeout-s",
        type=float,
        default=10.0,
        help="--overload: each request's client timeout (default: %(default)g)",
    )
    bench_gateway.add_argument(
        "--output", default=None, help="also write the JSON result to this file"
    )
    bench_isolation = bench_commands.add_parser(
        "isolation",
        help="the real stack (tiny model) under fcfs and vtc: three steady tenants' TTFT with "
        "and without a fourth flooding at ten times their rate",
    )
    bench_isolation.add_argument(
        "--policies", default="fcfs,vtc", help="comma-separated (default: %(default)s)"
    )
    bench_isolation.add_argument(
        "--duration-s", type=float, default=30.0, help="length of each phase (default: %(default)s)"
    )
    bench_isolation.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    bench_isolation.add_argument(
        "--steady-share",
        type=float,
        default=0.10,
        help="each steady tenant's rate, as a fraction of the probed capacity; the flood sends "
        "ten times it (default: %(default)s)",
    )
    bench_isolation.add_argument(
        "--output", default=None, help="also write the JSON result to this file"
    )
    bench_hol = bench_commands.add_parser(
        "hol",
        help="head-of-line blocking on the real stack: one tenant's long prompt, then short "
        "prompts from it and from another tenant; their TTFT",
    )
    from bench.hol_bench import add_arguments as add_hol_arguments

    add_hol_arguments(bench_hol)
    bench_slo = bench_commands.add_parser(
        "slo",
        help="the real stack: interactive tenants' TTFT and TPOT alone and under a flood of "
        "batch-class long prompts, with SLO attainment",
    )
    from bench.slo_bench import add_arguments as add_slo_arguments

    add_slo_arguments(bench_slo)
    bench_soak = bench_commands.add_parser(
        "soak",
        help="the real stack (null engine): tenants' streamed and unstreamed requests with "
        "client disconnects while workers are killed and restarted; lost, 5xx, and the usage "
        "ledger against the clients' counts",
    )
    from bench.soak_bench import add_arguments as add_soak_arguments

    add_soak_arguments(bench_soak)
    bench_fairness = bench_commands.add_parser(
        "fairness",
        help="the real stack (tiny model): weighted tenants' Jain index, and a tenant back "
        "from idle against a steady one (the lift rule), per policy",
    )
    bench_fairness.add_argument(
        "--policies", default="vtc,dlpm,d2lpm", help="comma-separated (default: %(default)s)"
    )
    bench_fairness.add_argument("--prefill-workers", type=int, default=2)
    bench_fairness.add_argument("--concurrency", type=int, default=48)
    bench_fairness.add_argument("--lift-concurrency", type=int, default=80)
    bench_fairness.add_argument("--warmup-s", type=float, default=10.0)
    bench_fairness.add_argument("--window-s", type=float, default=60.0)
    bench_fairness.add_argument("--off-s", type=float, default=30.0)
    bench_fairness.add_argument("--seed", type=int, default=0)
    bench_fairness.add_argument("--output", default=None, help="also write the JSON result here")
    bench_models = bench_commands.add_parser(
        "models",
        help="the real stack with two models (SmolLM2 and the tiny model, a prefill and a decode "
        "worker each): two tenants of equal weight on the expensive and the cheap model, Jain's "
        "index of their service normalised by the models' cost factors, per policy",
    )
    bench_models.add_argument(
        "--policy", default="vtc,dlpm", help="comma-separated (default: %(default)s)"
    )
    bench_models.add_argument(
        "--scenarios",
        default="disjoint,shared",
        help="disjoint: P on the expensive model, Q on the cheap one; shared: P on both, Q on "
        "the cheap one (default: %(default)s)",
    )
    bench_models.add_argument(
        "--seconds", type=float, default=60.0, help="the measurement window (default: 60)"
    )
    bench_models.add_argument(
        "--warmup-s", type=float, default=15.0, help="before each window (default: 15)"
    )
    bench_models.add_argument(
        "--calibrate-s",
        type=float,
        default=30.0,
        help="load before the scenarios, so that the cost factors are measured (default: 30)",
    )
    bench_models.add_argument(
        "--factors",
        choices=("measured", "pinned"),
        default="measured",
        help="pinned: set by the admin API at the end of the warm-up (default: %(default)s)",
    )
    bench_models.add_argument(
        "--cheap-factor",
        type=float,
        default=None,
        help="with --factors pinned: the tiny model's factor (default: its measured one at the "
        "end of the warm-up)",
    )
    bench_models.add_argument(
        "--concurrency", type=int, default=160, help="in flight on the cheap model (default: 160)"
    )
    bench_models.add_argument(
        "--reference-concurrency",
        type=int,
        default=48,
        help="in flight on the expensive model (default: 48)",
    )
    bench_models.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    bench_models.add_argument("--output", default=None, help="also write the JSON result here")

    bench_fidelity = bench_commands.add_parser(
        "fidelity",
        help="the same traces through the real stack (tiny model) and the simulator: "
        "per-tenant service shares side by side",
    )
    bench_fidelity.add_argument(
        "--scenarios", default="weighted,overload", help="comma-separated (default: %(default)s)"
    )
    bench_fidelity.add_argument(
        "--policies", default="vtc,dlpm,d2lpm", help="comma-separated (default: %(default)s)"
    )
    bench_fidelity.add_argument("--duration-s", type=float, default=40.0)
    bench_fidelity.add_argument("--prefill-workers", type=int, default=2)
    bench_fidelity.add_argument("--overload", type=float, default=2.0)
    bench_fidelity.add_argument("--seed", type=int, default=0)
    bench_fidelity.add_argument(
        "--model", default=None, help="latency model JSON (default: the tiny model's)"
    )
    bench_fidelity.add_argument(
        "--refit", action="store_true", help="fit the tiny model's latency model first"
    )
    bench_fidelity.add_argument("--output", default=None, help="also write the JSON result here")
    _add_bench_sched_parser(bench_commands)
    return parser


def _add_bench_sched_parser(bench_commands: Any) -> None:
    # Torch-free: the simulator's defaults are the engine's and the gateway's own.
    from engine.engine import EngineConfig
    from gateway.config import SchedulerSection

    sched = bench_commands.add_parser(
        "sched",
        help="scheduling policies side by side on one simulated trace (real policy classes, "
        "step times fitted to the engine)",
        description="Run every policy in --policies on the same seeded arrival trace of "
        "--scenario in a discrete-event simulation of the prefill and decode pools, and print "
        "fairness, latency and throughput per policy as one JSON line. With --fit, measure the "
        "engine instead and write the latency model's coefficients.",
    )
    sched.add_argument(
        "--scenario",
        default="overload",
        help="overload, overload_multi, weighted, on_off, prefix_heavy, prefix_heavy_long or "
        "slo_mix (default: %(default)s)",
    )
    sched.add_argument(
        "--policies",
        default="fcfs,vtc,dlpm,d2lpm,rr_lpm",
        help="comma-separated (default: %(default)s)",
    )
    sched.add_argument(
        "--workers", type=int, default=2, help="prefill workers (default: %(default)s)"
    )
    sched.add_argument(
        "--decode-workers", type=int, default=2, help="decode workers (default: %(default)s)"
    )
    sched.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    sched.add_argument(
        "--duration-s",
        type=float,
        default=None,
        help="simulated seconds of arrivals (default: the scenario's)",
    )
    sched.add_argument(
        "--overload",
        type=float,
        default=2.0,
        help="offered load as a multiple of the simulated cluster's capacity "
        "(default: %(default)s)",
    )
    sched.add_argument(
        "--speedup",
        type=float,
        default=1.0,
        help="simulate a backend this many times faster than the fitted one; rates follow "
        "(default: %(default)s)",
    )
    sched.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="prefill workers' per-step token budget, the engine's (default: %(default)s)",
    )
    sched.add_argument(
        "--prefill-chunk-size",
        type=int,
        default=512,
        help="prompt tokens of one request in one prefill step (default: %(default)s)",
    )
    sched.add_argument(
        "--max-prefill-step-s",
        type=float,
        default=EngineConfig().max_prefill_step_s,
        help="also cap a prefill step at this many seconds of work at the worker's measured "
        "speed, as the engine does; 0: off (default: %(default)s)",
    )
    sched.add_argument(
        "--max-prefill-inflight-s",
        type=float,
        default=SchedulerSection().max_prefill_inflight_s,
        help="the gateway's scheduler.max_prefill_inflight_s: a prefill worker holds at most "
        "this many seconds of work at its measured speed; 0: off (default: %(default)s)",
    )
    sched.add_argument(
        "--latency-model",
        default=None,
        help="coefficients file (default: bench/latency_model.json)",
    )
    sched.add_argument("--output", default=None, help="also write the JSON result to this file")
    sched.add_argument("--plot", default=None, help="write service over time to this PNG")
    sched.add_argument(
        "--fit",
        action="store_true",
        help="measure the engine step by step and write the coefficients to --latency-model",
    )
    sched.add_argument(
        "--engine",
        default="default",
        help="with --fit: the model to measure (default: %(default)s)",
    )
    sched.add_argument("--quick", action="store_true", help="with --fit: fewer measurements")


def _add_worker_arguments(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    _add_model_argument(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="HTTP bind address (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=default_port,
        help="HTTP port; 0 picks one (default: %(default)s)",
    )
    parser.add_argument(
        "--kv-host",
        default="127.0.0.1",
        help="the address peers reach this worker's KV data plane at (default: %(default)s)",
    )
    parser.add_argument("--worker-id", default="", help="default: ROLE-HOSTNAME-PORT")
    parser.add_argument(
        "--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)"
    )
    parser.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="KV blocks (default: as many as --kv-cache-gib holds)",
    )
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="default: %(default)s")
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=64,
        help="requests in a batch at once (default: %(default)s)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="tokens per step (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill-chunk-size",
        type=int,
        default=512,
        help="prompt tokens per chunk (default: %(default)s)",
    )
    parser.add_argument(
        "--max-prefill-step-s",
        type=float,
        default=0.5,
        help="cap a step's prompt tokens at what the measured prefill speed computes in this "
        "many seconds, so short prompts are not stuck behind long chunks on a slow backend; "
        "0 turns it off (default: %(default)s)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--kv-timeout",
        type=float,
        default=30.0,
        help="seconds any one wait of the KV data plane may take (default: %(default)s)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a caller waits for a request's next result (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logs go to stderr (default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default=None,
        choices=["text", "json"],
        help="json: one object per line (default: $FAIRGATE_TELEMETRY_LOG_FORMAT, else text)",
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="shut down when standard input closes (for workers started by another process)",
    )
    parser.add_argument(
        "--gateway",
        default=None,
        metavar="URL",
        help="register with the gateway at URL (it adds this worker and polls it), renew the "
        "registration every --heartbeat-s seconds, and unregister on a graceful stop; needs "
        "the gateway's registration token, from $FAIRGATE_REGISTRATION_TOKEN or "
        "--registration-token",
    )
    parser.add_argument(
        "--registration-token",
        default=None,
        metavar="TOKEN",
        help="with --gateway: the gateway's registration token (prefer "
        "$FAIRGATE_REGISTRATION_TOKEN: a flag shows in ps)",
    )
    parser.add_argument(
        "--advertise-url",
        default=None,
        metavar="URL",
        help="with --gateway: where the gateway reaches this worker (default: "
        "http://HOST:PORT, with --kv-host as HOST when --host binds every address)",
    )
    parser.add_argument(
        "--heartbeat-s",
        type=float,
        default=10.0,
        help="with --gateway: seconds between registrations (default: %(default)s)",
    )


def _run_model(args: argparse.Namespace) -> int:
    from engine.model_store import default_model_path, pull_default_model

    if args.model_command == "pull":
        print(pull_default_model(force=args.force))
    else:
        print(default_model_path())
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from engine.model_store import resolve_model, tokenizer_path
    from engine.tokenizer import Tokenizer
    from transfer.messages import SamplingSpec

    messages = []
    if args.system is not None:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    sampling = SamplingSpec(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    sampling.to_params()  # bad values fail here, before any model loads
    if args.disaggregated:
        tokenizer = Tokenizer.load(tokenizer_path(resolve_model(args.model)))
        prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        output_ids = _generate_disaggregated(args, prompt_ids, sampling)
    else:
        from engine.loader import load_engine

        loaded = load_engine(args.model, device=args.device, precision=args.precision)
        tokenizer = loaded.tokenizer
        prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        [output_ids] = loaded.engine.generate([prompt_ids], sampling.to_params())
    print(tokenizer.decode(output_ids, skip_special_tokens=True).strip())
    return 0


def _generate_disaggregated(
    args: argparse.Namespace, prompt_ids: list[int], sampling: Any
) -> list[int]:
    import asyncio
    import uuid

    from deploy.launcher import WorkerSpec, start_workers
    from transfer.client import DecodeClient, PrefillClient, run_disaggregated
    from transfer.errors import FairgateError
    from transfer.messages import TokenFrame

    log_level = "info" if args.verbose else "warning"
    worker_args = ["--device", args.device, "--precision", args.precision, "--log-level", log_level]
    workers = start_workers(
        [
            WorkerSpec("prefill", args.model, worker_args),
            WorkerSpec("decode", args.model, worker_args),
        ]
    )

    async def drive() -> list[int]:
        async with (
            PrefillClient(workers[0].http_url) as prefill,
            DecodeClient(workers[1].http_url) as decode,
        ):
            output_ids: list[int] = []
            frames = run_disaggregated(prefill, decode, uuid.uuid4().hex, prompt_ids, sampling)
            async for frame in frames:
                if not isinstance(frame, TokenFrame):  # nothing else preempts this one request
                    raise FairgateError("the request was preempted")
                output_ids.extend(frame.token_ids)
            return output_ids

    try:
        return asyncio.run(drive())
    finally:
        for worker in workers:
            worker.stop()


def _run_worker(args: argparse.Namespace) -> int:
    from engine.serving import WorkerConfig, run_worker

    if args.exit_with_parent:
        exit_when_stdin_closes()
    role: WorkerRole = "prefill"
    if args.command == "decode-worker":
        role = "colocated" if args.colocated else "decode"
    from transfer.telemetry import configure_logging

    configure_logging(
        logging.DEBUG if args.verbose else args.log_level.upper(),
        args.log_format or _env_log_format(),
    )
    config = WorkerConfig(
        role=role,
        worker_id=args.worker_id,
        model=args.model,
        device=args.device,
        precision=args.precision,
        host=args.host,
        port=args.port,
        kv_host=args.kv_host,
        kv_port=getattr(args, "kv_port", 0),
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_gib=args.kv_cache_gib,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_chunk_size=args.prefill_chunk_size,
        max_prefill_step_s=args.max_prefill_step_s or None,
        num_threads=args.threads,
        kv_timeout_s=args.kv_timeout,
        kv_wait_timeout_s=getattr(args, "kv_wait_timeout", 120.0),
        request_timeout_s=args.request_timeout,
        preemption=getattr(args, "preemption", "recompute"),
        swap_space_gib=getattr(args, "swap_space_gb", None),
    )
    service: WorkerService
    if role == "prefill":
        from prefill_worker.service import PrefillService

        service = PrefillService(config)
    else:
        from decode_worker.service import ColocatedService, DecodeService

        service = ColocatedService(config) if role == "colocated" else DecodeService(config)
    if args.gateway is None:
        return run_worker(service)
    # The service knows its URL once its port is bound, inside ``run_worker``.
    registration = _registration(args, role, lambda: args.advertise_url or service.http_url)
    # uvicorn stops for SIGTERM, then raises it again with the handler it found: the default
    # one would end the process there, before it unregisters. So the handler it finds records
    # the signal, and the process ends by it once it has unregistered, as it would have.
    terms: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terms.append(signum))
    registration.start()
    try:
        return run_worker(service)
    finally:
        registration.stop(unregister=True)
        signal.signal(signal.SIGTERM, previous)
        if terms:
            signal.raise_signal(signal.SIGTERM)


def _registration(
    args: argparse.Namespace, role: WorkerRole, advertise_url: Callable[[], str]
) -> Registration:
    """The worker's registration with ``--gateway`` (``transfer.registration``), not started;
    ``ValueError`` for a missing token or a URL that is not one."""
    import os

    from transfer.registration import TOKEN_ENV, Registration, is_worker_url

    for flag, url in (("--gateway", args.gateway), ("--advertise-url", args.advertise_url)):
        if url is not None and not is_worker_url(url):
            raise ValueError(f"{flag} {url!r} is not an http(s)://HOST[:PORT][/PATH] URL")
    token = args.registration_token or os.environ.get(TOKEN_ENV, "")
    return Registration(args.gateway, token, role, advertise_url, heartbeat_s=args.heartbeat_s)


def _run_gateway(args: argparse.Namespace) -> int:
    from gateway.app import run_gateway
    from gateway.config import load_config

    if args.exit_with_parent:
        exit_when_stdin_closes()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per worker call otherwise
    config = load_config(
        args.config,
        overrides={
            "gateway": {
                "host": args.host,
                "port": args.port,
                "prefill_workers": args.prefill,
                "decode_workers": args.decode,
                "colocated_workers": args.colocated,
            },
            "store": {"path": args.store},
            "model": {"name": args.model},
            "scheduler": {"policy": args.policy},
            "telemetry": {"log_format": args.log_format},
        },
    )
    from transfer.telemetry import configure_logging

    configure_logging(
        logging.DEBUG if args.verbose else args.log_level.upper(), config.telemetry.log_format
    )
    return run_gateway(config)


def _env_log_format() -> LogFormat:
    import os

    value = os.environ.get("FAIRGATE_TELEMETRY_LOG_FORMAT", "text")
    if value not in ("text", "json"):
        raise ValueError(f"FAIRGATE_TELEMETRY_LOG_FORMAT must be text or json, got {value!r}")
    return "json" if value == "json" else "text"


def _run_up(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deploy.stack import StackConfig, default_state_dir, run_up
    from deploy.supervisor import RestartPolicy

    # One line per worker exit and restart: the operator should see them at the default level.
    logging.getLogger("deploy.supervisor").setLevel(logging.INFO)
    gateway_args = [] if args.policy is None else ["--policy", args.policy]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if models and args.engine != "default":
        raise SystemExit("fairgate up: give --engine or --models, not both")
    return run_up(
        StackConfig(
            engine=args.engine,
            models=models,
            num_prefill_workers=args.prefill_workers,
            num_decode_workers=args.decode_workers,
            port=args.port,
            host=args.host,
            state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
            worker_args=["--log-level", "warning"],
            gateway_args=gateway_args,
            threads_per_worker=args.threads,
            restart_policy=RestartPolicy(
                max_restarts=args.max_restarts, window_s=args.restart_window
            ),
        )
    )


def _run_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "sched":
        return _run_bench_sched(args)
    if args.bench_command == "gateway":
        return _run_bench_gateway(args)
    if args.bench_command == "isolation":
        from bench.isolation_bench import run_isolation_bench

        return run_isolation_bench(
            policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
            duration_s=args.duration_s,
            seed=args.seed,
            steady_share=args.steady_share,
            output=args.output,
        )
    if args.bench_command == "hol":
        from bench.hol_bench import plan_of, run_hol_bench

        run_hol_bench(plan_of(args), output=args.output)
        return 0
    if args.bench_command == "soak":
        from bench.soak_bench import run as run_soak_bench

        return run_soak_bench(args)
    if args.bench_command == "slo":
        from bench.slo_bench import plan_of as slo_plan_of
        from bench.slo_bench import run_slo_bench

        run_slo_bench(slo_plan_of(args), output=args.output)
        return 0
    if args.bench_command == "fairness":
        from bench.fairness_bench import run_fairness_bench

        return run_fairness_bench(
            policies=_names(args.policies),
            num_prefill_workers=args.prefill_workers,
            concurrency=args.concurrency,
            lift_concurrency=args.lift_concurrency,
            warmup_s=args.warmup_s,
            window_s=args.window_s,
            off_s=args.off_s,
            seed=args.seed,
            output=args.output,
        )
    if args.bench_command == "models":
        from bench.model_fairness_bench import run_model_fairness_bench, scenarios_of

        return run_model_fairness_bench(
            policies=_names(args.policy),
            scenarios=scenarios_of(_names(args.scenarios)),
            concurrency=args.concurrency,
            reference_concurrency=args.reference_concurrency,
            warmup_s=args.warmup_s,
            window_s=args.seconds,
            factors=args.factors,
            cheap_factor=args.cheap_factor,
            calibrate_s=args.calibrate_s,
            seed=args.seed,
            output=args.output,
        )
    if args.bench_command == "fidelity":
        from bench.fidelity_bench import TINY_MODEL_PATH, run_fidelity_bench
        from bench.report import print_result

        print_result(
            run_fidelity_bench(
                scenarios=_names(args.scenarios),
                policies=_names(args.policies),
                duration_s=args.duration_s,
                num_prefill_workers=args.prefill_workers,
                overload=args.overload,
                seed=args.seed,
                model_path=Path(args.model) if args.model else TINY_MODEL_PATH,
                refit=args.refit,
            ),
            args.output,
        )
        return 0
    if args.bench_command == "transfer":
        from bench.transfer_bench import run_transfer_bench

        return run_transfer_bench(quick=args.quick, output=args.output)
    from bench.engine_bench import run_engine_bench

    return run_engine_bench(
        model=args.model,
        device=args.device,
        precision=args.precision,
        quick=args.quick,
        output=args.output,
    )


def _names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip())


def _run_bench_gateway(args: argparse.Namespace) -> int:
    if args.overload is not None:
        from bench.overload_bench import OverloadPlan, run_overload_bench

        try:
            factors = tuple(float(f) for f in args.overload.split(",") if f.strip())
            plan = OverloadPlan.of(
                factors, quick=args.quick, client_timeout_s=args.client_timeout_s
            )
        except ValueError as exc:  # not numbers, or not positive ones
            raise SystemExit(f"--overload {args.overload!r}: {exc}") from None
        return run_overload_bench(plan, quick=args.quick, output=args.output)
    if args.prompt_flood:
        from bench.prompt_flood_bench import PromptFloodPlan, run_prompt_flood_bench

        return run_prompt_flood_bench(
            PromptFloodPlan.of(quick=args.quick), quick=args.quick, output=args.output
        )
    from bench.gateway_bench import run_gateway_bench

    return run_gateway_bench(
        quick=args.quick, tracing=args.tracing, redis=args.redis, output=args.output
    )


def _run_bench_sched(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench.latency_model import DEFAULT_MODEL_PATH
    from bench.sched_bench import run_fit, run_sched_bench

    model_path = Path(args.latency_model) if args.latency_model else DEFAULT_MODEL_PATH
    if args.fit:
        return run_fit(engine=args.engine, quick=args.quick, model_path=model_path)
    return run_sched_bench(
        scenario=args.scenario,
        policies=[name.strip() for name in args.policies.split(",") if name.strip()],
        num_prefill_workers=args.workers,
        num_decode_workers=args.decode_workers,
        seed=args.seed,
        duration_s=args.duration_s,
        overload=args.overload,
        speedup=args.speedup,
        prefill_step_tokens=args.max_num_batched_tokens,
        prefill_chunk_tokens=args.prefill_chunk_size,
        prefill_step_max_s=args.max_prefill_step_s or None,
        max_prefill_inflight_s=args.max_prefill_inflight_s or None,
        model_path=model_path,
        output=args.output,
        plot=args.plot,
    )


def _run_admin(args: argparse.Namespace) -> int:
    from deploy.admin_cli import run_admin

    return run_admin(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from deploy.launcher import LaunchError
    from engine.config import ModelLoadError
    from transfer.errors import FairgateError

    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "model": _run_model,
        "generate": _run_generate,
        "bench": _run_bench,
        "prefill-worker": _run_worker,
        "decode-worker": _run_worker,
        "gateway": _run_gateway,
        "up": _run_up,
        "admin": _run_admin,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError, ModelLoadError, FairgateError, LaunchError) as exc:
        print(f"fairgate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
