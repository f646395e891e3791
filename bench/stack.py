"""The benchmark's setups: which ext_proc server runs behind Envoy, with which policy.

Each setup is a fresh `extproc.dev.devstack.Stack` on fresh loopback ports, with the
mock provider swapped for the lighter `bench.provider`:

  envoy     Envoy alone: the same bootstrap, ext_proc filter (and its cluster) removed
  noop      Envoy + `bench.noop_extproc` (answers every message with an empty response)
            on grpc.aio: the floor of issue 14's targets
  noop-h2   the same no-op on the sidecar's own gRPC server (`extproc.h2grpc`): what is
            left of the sidecar's cost once the transport is the same
  meter     Envoy + the sidecar, default policy: usage metering only
  full      Envoy + the sidecar, full policy: API-key auth, a request guard (reject
            secrets), a token limit, a response masking guard (PII but email, and
            secrets) and metering
  full-nomask  `full` without its response guard: the base of the guards-on ratio
  translated  `meter`, but the model is an alias served by an Anthropic-format provider:
            the OpenAI client's request and stream are translated (issue 10); its base
            is `meter`
  noop-uvloop, meter-asyncio, full-asyncio  (not in the default run: `--setups`) the
            no-op server on uvloop, and the sidecar setups on the standard library's
            asyncio loop (`server.event_loop: asyncio`): what the event loop is worth,
            side by side in one run (docs/performance.md, "The event loop")
  meter-offpath  `meter` with `streaming.meter_off_path: auto`, and a client that asks
            for usage (`stream_options.include_usage`), so every stream qualifies: the
            response body goes to the observing filter, off the latency path

A `--policy FILE` replaces the built-in policy of the sidecar setups (`meter`, `full`).
"""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extproc.bootstrap import EXTPROC_CLUSTER, EXTPROC_FILTER, render_bootstrap
from extproc.dev.devstack import Stack
from extproc.envoybin import envoy_binary

REPO_ROOT = Path(__file__).resolve().parent.parent
SETUPS = ("envoy", "noop", "noop-h2", "meter", "full", "full-nomask", "translated",
          "meter-offpath")  # fmt: skip
# Run only when named in `--setups`: the event loop's share, side by side.
LOOP_SETUPS = ("noop-uvloop", "meter-asyncio", "full-asyncio", "noop-h2-uvloop")
# Setups that run `extproc serve`.
SIDECARS = ("meter", "full", "full-nomask", "translated", "meter-offpath", "meter-asyncio",
            "full-asyncio")  # fmt: skip
# Setups whose client asks for usage: the stream then qualifies to be metered off path.
INCLUDE_USAGE = ("meter-offpath",)
SETUP_LABEL = {
    "envoy": "Envoy alone",
    "noop": "+ no-op ext_proc",
    "meter": "+ sidecar, metering",
    "full": "+ sidecar, full",
    "full-nomask": "+ full, no resp. guard",
    "translated": "+ metering, translated",
    "meter-offpath": "+ sidecar, off path",
    "noop-uvloop": "+ no-op on uvloop",
    "noop-h2": "+ no-op, own transport",
    "noop-h2-uvloop": "+ no-op, own, uvloop",
    "meter-asyncio": "+ metering, asyncio",
    "full-asyncio": "+ full, asyncio",
}
# The key the load client sends (`BENCH_API_KEY`) for the setups with auth.
BENCH_KEY = "bench-key-0123456789abcdef"

# Metering only: the product's defaults (streams without include_usage get it injected
# and the usage chunk hidden), one open route, no auth.
METER_POLICY: dict[str, Any] = {
    "server": {"log_level": "info"},
    "envoy": {},
    "providers": {"mock": {"format": "openai"}},
    "routes": [{"name": "bench", "prefix": "/v1/", "provider": "mock"}],
}
# Every per-request and per-chunk stage a typical production policy turns on. The token
# limit is high enough never to refuse (each request reserves about 1 k tokens). The
# response guard masks every built-in detector but email: any word may begin an email
# address, so with it a frame that ends inside a word waits for the next frame, which
# adds one inter-frame gap of latency (bench/guard_bench.py measures that case), and
# the sweep's gaps grow with the streams.
RESPONSE_DETECTORS = ["credit_card", "us_ssn", "phone", "iban", "ip_address", "secrets"]
FULL_POLICY: dict[str, Any] = {
    **METER_POLICY,
    "consumers": {"bench": {"keys": [{"name": "k", "value": BENCH_KEY}]}},
    "routes": [{"name": "bench", "prefix": "/v1/", "provider": "mock", "auth": "required"}],
    "guards": {
        "rules": [
            {"name": "no-secrets", "action": "reject", "detectors": ["secrets"],
             "phases": ["request"]},
            {"name": "pii", "action": "mask", "detectors": RESPONSE_DETECTORS,
             "phases": ["response"]},
        ]
    },
    "rate_limits": {
        "limits": [{"name": "budget", "tokens": 10**12, "window": "1h", "by": "consumer"}]
    },
}  # fmt: skip


# The model the load client names, served by the bench provider's Anthropic Messages API.
TRANSLATED_ALIAS = {"gpt-4o-mini": {"provider": "mock_anthropic", "model": "claude-bench"}}


def setup_policy(setup: str) -> dict[str, Any]:
    """The built-in policy of a setup (a deep copy: callers may change it)."""
    base = FULL_POLICY if setup.startswith("full") else METER_POLICY
    policy = json.loads(json.dumps(base))
    if setup == "meter-offpath":
        policy["streaming"] = {"meter_off_path": "auto"}
    if setup == "full-nomask":
        rules = policy["guards"]["rules"]
        policy["guards"]["rules"] = [r for r in rules if "response" not in r["phases"]]
    if setup == "translated":
        policy["models"] = {"aliases": TRANSLATED_ALIAS}
    if setup.endswith("-asyncio"):
        policy["server"] = {**policy["server"], "event_loop": "asyncio"}
    return policy


def setup_api_key(setup: str, override: str | None = None) -> str | None:
    """What the client sends as its bearer key: `--api-key`, or the built-in one."""
    if override:
        return override
    return BENCH_KEY if setup.startswith("full") else None


def free_port(run: int = 1) -> int:
    """A loopback port such that `run` consecutive ports from it are free (workers take
    the gRPC port + N)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if run == 1 or all(_bindable(base + i) for i in range(1, run)):
            return base
    raise OSError(f"no run of {run} free loopback ports")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def write_policy(
    directory: Path,
    setup: str = "meter",
    base: Path | None = None,
    workers: int = 1,
    telemetry: dict | None = None,
) -> Path:
    """The setup's policy (or `base`, e.g. --policy config/dev.yaml) on fresh loopback
    ports, with every route sent to the bench provider (named "mock" so `Stack` starts
    it)."""
    config = yaml.safe_load(base.read_text()) if base else setup_policy(setup)
    config.setdefault("server", {}).update(
        grpc_listen=f"127.0.0.1:{free_port(workers)}",
        metrics_listen=f"127.0.0.1:{free_port()}",
    )
    # The bench measures what streams cost, not admission control: with the product's
    # defaults (64 open exchanges per worker, a 250 ms loop-lag limit) the sweep's 200
    # and 500 streams were mostly shed with 503 `overloaded`. A policy file given with
    # --policy keeps its own limits.
    for key, value in (
        ("max_open_streams", 100_000),
        ("max_queued_requests", 100_000),
        ("max_queue_delay_ms", 0),
    ):
        config["server"].setdefault(key, value)
    config.setdefault("envoy", {}).update(
        listen=f"127.0.0.1:{free_port()}",
        admin=f"127.0.0.1:{free_port()}",
        access_log=str(directory / "access.log"),
    )
    url = f"http://127.0.0.1:{free_port()}"
    config["providers"] = {"mock": {"url": url, "format": "openai"}}
    if setup == "translated":  # the same bench provider, its Anthropic API
        config["providers"]["mock_anthropic"] = {"url": url, "format": "anthropic"}
    for route in config["routes"]:
        route["provider"] = "mock"
    if telemetry is not None:  # --tracing
        config["telemetry"] = telemetry
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class BenchStack(Stack):
    """`Stack` with the bench provider as "mock" and a choice of ext_proc server."""

    variant: str = "meter"  # one of SETUPS
    frames: int = 64
    gap_ms: float = 5.0

    @property
    def ext_proc(self) -> str | None:
        """Which kind of ext_proc server runs: None (Envoy alone), "noop" or "sidecar"."""
        if self.variant == "envoy":
            return None
        return "noop" if self.variant.startswith("noop") else "sidecar"

    def start_mock(self) -> None:
        provider = self.config.providers["mock"]
        self._spawn("mock", [
            sys.executable, "-m", "bench.provider", "--host", provider.host,
            "--port", str(provider.port), "--frames", str(self.frames),
            "--gap-ms", str(self.gap_ms),
        ])  # fmt: skip

    def start_sidecar(self) -> None:
        if self.ext_proc is None:
            return
        if self.ext_proc == "noop":
            server = self.config.server
            self._spawn("sidecar", [
                sys.executable, "-m", "bench.noop_extproc",
                "--listen", server.grpc_listen, "--stats", server.metrics_listen,
                "--loop", "uvloop" if self.variant.endswith("uvloop") else "asyncio",
                "--transport", "h2grpc" if "-h2" in self.variant else "grpcio",
            ])  # fmt: skip
            return
        super().start_sidecar()

    def wait_sidecar(self, deadline: float) -> None:
        if self.ext_proc is not None:
            super().wait_sidecar(deadline)

    def start_envoy(self) -> None:
        if self.ext_proc is not None:
            super().start_envoy()
            return
        # Same argv as Stack.start_envoy; only the bootstrap differs.
        bootstrap = self.workdir / "envoy.yaml"
        bootstrap.write_text(yaml.safe_dump(envoy_alone_bootstrap(self.config), sort_keys=False))
        self._spawn("envoy", [
            str(envoy_binary()), "-c", str(bootstrap), "--use-dynamic-base-id",
            "--concurrency", str(self.envoy_concurrency), "--log-level", "warn",
        ])  # fmt: skip

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.pid if proc is not None and proc.poll() is None else None

    def log_hint(self) -> str:
        """The last warning lines of Envoy's and the ext_proc server's logs."""
        lines = []
        for name in ("envoy", "sidecar"):
            tail = [ln for ln in self.log(name).splitlines() if not ln.startswith("{")][-3:]
            lines += [f"\n    {name}: {ln[:300]}" for ln in tail]
        return "".join(lines)


def envoy_alone_bootstrap(config: Any) -> dict[str, Any]:
    """The product's bootstrap minus the ext_proc filter, its per-route config and cluster."""
    boot = render_bootstrap(config)
    resources = boot["static_resources"]
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            for net_filter in chain["filters"]:
                hcm = net_filter["typed_config"]
                if "http_filters" not in hcm:
                    continue
                filters = hcm["http_filters"]
                hcm["http_filters"] = [f for f in filters if f["name"] != EXTPROC_FILTER]
                for vhost in hcm["route_config"]["virtual_hosts"]:
                    for route in vhost["routes"]:
                        per_filter = route.get("typed_per_filter_config", {})
                        per_filter.pop(EXTPROC_FILTER, None)
                        if not per_filter:
                            route.pop("typed_per_filter_config", None)
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != EXTPROC_CLUSTER]
    return boot
