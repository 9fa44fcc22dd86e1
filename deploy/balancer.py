"""haproxy in front of gateway replicas, for the replicas' end-to-end test and benchmark: one URL
whose requests go to a replica picked at random (``balance random``), as a cloud load balancer
or a Kubernetes Service spreads them. A replica that stops answering its ``/readyz`` is taken out
within a second (``inter 250ms fall 2``); the requests it held end with a connection error for
their clients, as they would behind any balancer. The binary comes from deploy/haproxy.sh
(Debian's package). Torch-free.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["Balancer", "start_balancer"]

HAPROXY_SCRIPT = Path(__file__).resolve().parent / "haproxy.sh"


@dataclass(slots=True)
class Balancer:
    url: str
    process: subprocess.Popen[bytes]
    directory: tempfile.TemporaryDirectory[str]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.directory.cleanup()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(port: int, backends: Sequence[str]) -> str:
    servers = "\n".join(
        f"    server g{index} {url.removeprefix('http://')} check inter 250ms fall 2 rise 2"
        for index, url in enumerate(backends)
    )
    return f"""global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    option http-keep-alive
frontend gateways
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance random
    option httpchk GET /readyz
{servers}
"""


def start_balancer(backends: Sequence[str], *, timeout_s: float = 20.0) -> Balancer:
    """haproxy on a free loopback port in front of ``backends`` (``http://host:port``); returns
    once a request through it is answered."""
    binary = (
        subprocess.run([str(HAPROXY_SCRIPT)], check=True, capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    directory = tempfile.TemporaryDirectory(prefix="fairgate-haproxy-")
    port = _free_port()
    config = Path(directory.name) / "haproxy.cfg"
    config.write_text(_config(port, backends), encoding="utf-8")
    log_path = Path(directory.name) / "haproxy.log"
    with log_path.open("wb") as log:  # (the child keeps its own descriptor)
        process = subprocess.Popen(
            [binary, "-f", str(config), "-db"], stdout=subprocess.DEVNULL, stderr=log
        )
    balancer = Balancer(f"http://127.0.0.1:{port}", process, directory)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            error = log_path.read_text(encoding="utf-8", errors="replace")
            directory.cleanup()
            raise RuntimeError(f"haproxy exited with status {process.returncode}: {error}")
        try:
            if httpx.get(balancer.url + "/readyz", timeout=1.0).status_code == 200:
                return balancer
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            balancer.stop()
            raise RuntimeError(f"haproxy did not answer within {timeout_s:g} s")
        time.sleep(0.1)
