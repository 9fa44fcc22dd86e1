"""A worker pod's preStop hook: wait until the worker has nothing left to do, so that the SIGTERM
that follows cuts nothing short.

A terminating pod is not ready, so its headless Service stops publishing its address at once;
the gateway resolves that name again every ``gateway.dns_refresh_s`` and places no new request
on an address that has left it. This hook waits ``--settle-s`` for that, then asks the worker's
``/v1/load`` every second until nothing is waiting, running, reserved, being handed off or
swapped out there, the worker stops answering, or ``--limit-s`` has passed since the hook began.
It always exits 0: Kubernetes sends SIGTERM either way. Then the worker stops taking
connections and gives what still runs ``transfer.http.SERVER_SHUTDOWN_S`` (5 s) before it
cancels it; the gateway moves such requests to other workers.

Run by the fairgate image's Python (``python /etc/fairgate/worker_drain.py --port=8101``):
the standard library and fairgate's torch-free wire messages.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time
import urllib.request

import msgspec

from transfer.messages import WorkerLoad, decode_message

POLL_S = 1.0
CALL_TIMEOUT_S = 2.0


def work_left(load: WorkerLoad) -> int:
    """Requests the worker still holds in any stage."""
    return (
        load.num_waiting
        + load.num_running
        + load.num_reserved
        + load.num_pending_transfers
        + load.num_swapped
    )


def load_of(url: str) -> WorkerLoad | None:
    """The worker's load report; None when it does not answer with one."""
    try:
        with urllib.request.urlopen(url, timeout=CALL_TIMEOUT_S) as response:
            return decode_message(response.read(), WorkerLoad)
    except (OSError, http.client.HTTPException, msgspec.DecodeError, msgspec.ValidationError):
        # OSError: refused, reset, timed out, or an HTTP error status (urllib.error.URLError).
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="wait until a fairgate worker is idle")
    parser.add_argument("--port", type=int, required=True, help="the worker's HTTP port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--settle-s", type=float, default=10.0, help="first wait this long for the gateway"
    )
    parser.add_argument("--limit-s", type=float, default=100.0, help="wait at most this long")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.limit_s
    time.sleep(max(0.0, min(args.settle_s, args.limit_s)))
    url = f"http://{args.host}:{args.port}/v1/load"
    while True:
        load = load_of(url)
        if load is None:
            print("worker_drain: the worker does not answer; done", file=sys.stderr)
            return 0
        left = work_left(load)
        if left == 0:
            return 0
        if time.monotonic() + POLL_S > deadline:
            print(f"worker_drain: {left} requests still there at the limit", file=sys.stderr)
            return 0
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main())
