"""Running it for real, without Envoy: the worker and shutdown settings, worker
addressing in the config and the rendered bootstrap, and the policy watcher that
live reload is built on (a ConfigMap update is a symlink swap, so content counts,
not mtimes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import cli
from extproc.bootstrap import EXTPROC_CLUSTER, render_bootstrap
from extproc.config import (
    WORKER_CHECKS,
    Config,
    ConfigError,
    check_workers,
    parse_config,
)
from extproc.netaddr import worker_addresses
from extproc.reload import PolicyWatcher, referenced_files, restart_needed
from tests.test_bootstrap import render_to, validate

MINIMAL: dict[str, Any] = {
    "providers": {"mock": {"url": "http://127.0.0.1:9000"}},
    "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
}


def policy(**sections: dict) -> dict[str, Any]:
    return {**MINIMAL, **sections}


def problems_of(document: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(document, "p.yaml")
    return info.value.problems


# ------------------------------------------------------------------ settings


def test_defaults_one_worker_thirty_seconds_grace() -> None:
    config = parse_config(policy())
    assert config.server.workers == 1
    assert config.server.shutdown_grace_seconds == 30
    assert config.envoy.sidecar_address is None


@pytest.mark.parametrize(
    ("section", "values", "key", "reason"),
    [
        ("server", {"workers": 0}, "server.workers", "expected a positive integer, got 0"),
        ("server", {"workers": 257}, "server.workers", "must be at most 256"),
        ("server", {"workers": "2"}, "server.workers", "expected an integer, got '2'"),
        (
            "server",
            {"shutdown_grace_seconds": -1},
            "server.shutdown_grace_seconds",
            "must be at least 0",
        ),
        ("envoy", {"sidecar_address": "Extproc:50051"}, "envoy.sidecar_address", "DNS name"),
        ("envoy", {"sidecar_address": "extproc"}, "envoy.sidecar_address", "host:port"),
        ("envoy", {"sidecar_address": "extproc:0"}, "envoy.sidecar_address", "1-65535"),
        ("envoy", {"sidecar_address": "10.0.0.1:70000"}, "envoy.sidecar_address", "1-65535"),
    ],
)
def test_bad_settings_name_key_and_reason(
    section: str, values: dict, key: str, reason: str
) -> None:
    ((got_key, got_reason),) = problems_of(policy(**{section: values}))
    assert got_key == key
    assert reason in got_reason


def test_accepted_sidecar_addresses() -> None:
    for address in ("extproc.ai-gateway.svc.cluster.local:50051", "10.1.2.3:50051", "[::1]:1"):
        config = parse_config(policy(envoy={"sidecar_address": address}))
        assert config.envoy.sidecar_address == address


def test_worker_addresses_are_consecutive_ports_or_numbered_sockets() -> None:
    assert worker_addresses("127.0.0.1:50051", 1) == ["127.0.0.1:50051"]
    assert worker_addresses("0.0.0.0:50051", 3) == [
        "0.0.0.0:50051",
        "0.0.0.0:50052",
        "0.0.0.0:50053",
    ]
    assert worker_addresses("[::1]:9", 2) == ["[::1]:9", "[::1]:10"]
    assert worker_addresses("unix:/run/x.sock", 1) == ["unix:/run/x.sock"]
    assert worker_addresses("unix:/run/x.sock", 2) == ["unix:/run/x.sock.0", "unix:/run/x.sock.1"]


def test_worker_ports_must_exist() -> None:
    problems = problems_of(policy(server={"grpc_listen": "127.0.0.1:65535", "workers": 2}))
    assert problems == [("server.grpc_listen", "2 workers need ports up to 65536")]


def test_worker_socket_paths_must_fit() -> None:
    path = "/" + "s" * 105  # fits alone, not with ".0"
    parse_config(policy(server={"grpc_listen": f"unix:{path}"}))
    ((key, reason),) = problems_of(policy(server={"grpc_listen": f"unix:{path}", "workers": 2}))
    assert key == "server.grpc_listen" and "longer than 107 bytes" in reason


@pytest.fixture
def one_process_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the rate-limit store registers: an in-process store refuses workers > 1."""

    def check(config: Config, workers: int) -> list[tuple[str, str]]:
        if workers > 1:
            return [("limits.store", f"an in-process store cannot serve {workers} workers")]
        return []

    monkeypatch.setattr("extproc.config.document.WORKER_CHECKS", [*WORKER_CHECKS, check])


def test_worker_check_hook_refuses_several_workers(one_process_store: None) -> None:
    parse_config(policy())
    problems = problems_of(policy(server={"workers": 2}))
    assert problems == [("limits.store", "an in-process store cannot serve 2 workers")]
    assert check_workers(parse_config(policy()), 3) == [
        ("limits.store", "an in-process store cannot serve 3 workers")
    ]


def test_serve_refuses_workers_flag_the_policy_cannot_run(
    one_process_store: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(policy()))
    assert cli.main(["serve", "--config", str(path), "--workers", "2"]) == 1
    assert f"{path}: limits.store: an in-process store cannot serve 2 workers" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("value", ["0", "x", "257"])
def test_serve_workers_flag_is_checked(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--config", "p.yaml", "--workers", value])
    assert info.value.code == 2
    assert "--workers" in capsys.readouterr().err


# ------------------------------------------------------------------ bootstrap


def endpoints(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "extproc"]
    lb = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return [e["endpoint"]["address"] for e in lb]


def extproc_cluster(bootstrap: dict[str, Any]) -> dict[str, Any]:
    (cluster,) = [
        c for c in bootstrap["static_resources"]["clusters"] if c["name"] == EXTPROC_CLUSTER
    ]
    return cluster


def test_every_worker_is_an_endpoint(tmp_path: Path) -> None:
    config = parse_config(policy(server={"grpc_listen": "0.0.0.0:50051", "workers": 3}))
    bootstrap = render_bootstrap(config)
    assert endpoints(bootstrap) == [
        {"socket_address": {"address": "127.0.0.1", "port_value": port}}
        for port in (50051, 50052, 50053)
    ]
    cluster = extproc_cluster(bootstrap)
    assert cluster["type"] == "STATIC"
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    assert cluster["outlier_detection"]["max_ejection_percent"] == 50
    assert cluster["health_checks"][0]["grpc_health_check"] == {}
    validate(render_to(tmp_path, config))


def test_unix_socket_workers_are_numbered_pipes(tmp_path: Path) -> None:
    config = parse_config(policy(server={"grpc_listen": f"unix:{tmp_path}/x.sock", "workers": 2}))
    assert endpoints(render_bootstrap(config)) == [
        {"pipe": {"path": f"{tmp_path}/x.sock.0"}},
        {"pipe": {"path": f"{tmp_path}/x.sock.1"}},
    ]
    validate(render_to(tmp_path, config))


def test_sidecar_by_service_dns_is_strict_dns(tmp_path: Path) -> None:
    config = parse_config(
        policy(
            server={"grpc_listen": "0.0.0.0:50051", "workers": 2},
            envoy={"sidecar_address": "extproc.ai-gateway.svc.cluster.local:50051"},
        )
    )
    bootstrap = render_bootstrap(config)
    cluster = extproc_cluster(bootstrap)
    assert cluster["type"] == "STRICT_DNS"
    assert endpoints(bootstrap) == [
        {"socket_address": {"address": "extproc.ai-gateway.svc.cluster.local", "port_value": p}}
        for p in (50051, 50052)
    ]
    validate(render_to(tmp_path, config))


# ------------------------------------------------------------------ the watcher


class Mount:
    """A file mounted as the kubelet mounts ConfigMaps and Secrets."""

    def __init__(self, root: Path, name: str, text: str) -> None:
        self.root, self.name, self.version = root, name, 0
        root.mkdir(parents=True, exist_ok=True)
        self.update(text)
        (root / name).symlink_to(f"..data/{name}")

    @property
    def path(self) -> str:
        return str(self.root / self.name)

    def update(self, text: str) -> None:
        self.version += 1
        version = self.root / f"..v{self.version}"
        version.mkdir()
        (version / self.name).write_text(text)
        os.utime(version / self.name, (1, 1))  # older than before: only content tells
        (self.root / "..tmp").symlink_to(version.name)
        os.replace(self.root / "..tmp", self.root / "..data")


def text(**sections: dict) -> str:
    return yaml.safe_dump(policy(**sections))


def watcher_for(mount: Mount) -> PolicyWatcher:
    from extproc.config import load_config

    return PolicyWatcher(mount.path, load_config(mount.path))


def test_unchanged_policy_reports_nothing(tmp_path: Path) -> None:
    mount = Mount(tmp_path, "policy.yaml", text())
    watcher = watcher_for(mount)
    assert watcher.check() is None
    mount.update(text())  # same content, new directory and an older mtime
    assert watcher.check() is None


def test_configmap_swap_is_seen_and_validated(tmp_path: Path) -> None:
    mount = Mount(tmp_path, "policy.yaml", text())
    watcher = watcher_for(mount)
    mount.update(text(streaming={"ensure_usage": False}))
    reload = watcher.check()
    assert reload is not None and reload.error is None
    assert reload.config is not None and reload.config.streaming.ensure_usage is False
    assert reload.config.path == mount.path
    assert watcher.check() is None


def test_invalid_change_is_reported_once_then_recovers(tmp_path: Path) -> None:
    mount = Mount(tmp_path, "policy.yaml", text())
    watcher = watcher_for(mount)
    mount.update(text(streaming={"ensure_usage": "yes"}))
    reload = watcher.check()
    assert reload is not None and reload.config is None and reload.error is not None
    assert reload.error.lines() == [
        f"{mount.path}: streaming.ensure_usage: expected true or false, got 'yes'"
    ]
    assert watcher.check() is None  # not again every second
    assert watcher.config.streaming.ensure_usage is True  # the one in force
    mount.update(text())
    reload = watcher.check()
    assert reload is not None and reload.config is not None


def test_missing_file_is_refused(tmp_path: Path) -> None:
    mount = Mount(tmp_path, "policy.yaml", text())
    watcher = watcher_for(mount)
    os.unlink(mount.path)
    reload = watcher.check()
    assert reload is not None and reload.error is not None
    assert reload.error.lines() == [f"{mount.path}: file not found"]


def test_rotated_key_file_counts_as_a_change(tmp_path: Path) -> None:
    secret = Mount(tmp_path / "secret", "openai", "sk-one\n")
    providers = {"mock": {"url": "http://127.0.0.1:9000", "api_key_file": secret.path}}
    mount = Mount(tmp_path / "config", "policy.yaml", text(providers=providers))
    watcher = watcher_for(mount)
    assert watcher.check() is None
    secret.update("sk-two\n")
    reload = watcher.check()
    assert reload is not None and reload.config is not None
    assert watcher.check() is None


def test_every_file_the_policy_names_is_watched(tmp_path: Path) -> None:
    """Consumer keys (and JWKS, secrets...) live in mounted Secrets too."""
    secret = Mount(tmp_path / "consumers", "team-a", "key-one\n")
    consumers = {"team-a": {"keys": [{"name": "main", "file": secret.path}]}}
    mount = Mount(tmp_path / "config", "policy.yaml", text(consumers=consumers))
    watcher = watcher_for(mount)
    assert secret.path in referenced_files(watcher.config)
    assert watcher.check() is None
    secret.update("key-two\n")
    reload = watcher.check()
    assert reload is not None and reload.config is not None


def test_settings_that_need_a_restart_are_named() -> None:
    old = parse_config(policy())
    same_server = parse_config(policy(streaming={"ensure_usage": False}))
    assert restart_needed(old, same_server) == []
    new = parse_config(
        policy(server={"grpc_listen": "127.0.0.1:6000", "workers": 2}, envoy={"listen": "[::1]:1"})
    )
    keys = [key for key, _ in restart_needed(old, new)]
    assert keys == ["server.grpc_listen", "server.workers", "envoy"]


# ------------------------------------------------------------------ readiness


async def health_status(target: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def test_readiness_checks_drive_grpc_health(tmp_path: Path) -> None:
    """A failing check (here: a shared store that cannot reach Redis) turns the worker
    NOT_SERVING; when it passes again the worker is SERVING; shutdown is NOT_SERVING."""
    import asyncio

    from extproc.config import load_config
    from extproc.dev.devstack import grpc_serving
    from extproc.server import Worker
    from tests.conftest import free_port

    path = tmp_path / "p.yaml"
    address = f"127.0.0.1:{free_port()}"
    path.write_text(
        text(server={"grpc_listen": address, "metrics_listen": f"127.0.0.1:{free_port()}"})
    )
    worker = Worker(load_config(str(path)))

    class Store:
        reachable = False

        async def readiness_check(self) -> str | None:
            return None if self.reachable else "redis unreachable"

    store = worker.shared.ratelimit_redis = Store()  # type: ignore[assignment]
    started = asyncio.Event()
    task = asyncio.create_task(worker.run(started))
    await started.wait()

    async def status_becomes(expected: str) -> None:
        for _ in range(100):
            if await health_status(address) == expected:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"health never became {expected}")

    try:
        assert await health_status(address) == "NOT_SERVING"
        store.reachable = True
        await status_becomes("SERVING")
        store.reachable = False
        await status_becomes("NOT_SERVING")
        store.reachable = True
        await status_becomes("SERVING")
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
    assert not grpc_serving(address)  # stopped: nothing answers any more
