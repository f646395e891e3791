"""The whole policy: one model per section, and the checks for running it in N workers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BeforeValidator, Field
from pydantic.json_schema import SkipJsonSchema

from extproc.config.access import AuthConfig, ConsumerConfig, ModelsConfig
from extproc.config.base import Section, describe, fail, section
from extproc.config.guards import GuardsConfig
from extproc.config.limits import RateLimitsConfig, rate_limit_workers
from extproc.config.routing import ProviderConfig, RouteConfig
from extproc.config.server import EnvoyConfig, ServerConfig, StreamingConfig
from extproc.config.telemetry import TelemetryConfig
from extproc.config.types import entries, in_file, name
from extproc.netaddr import UNIX_PATH_MAX, unix_socket_path, worker_addresses
from extproc.spend.settings import BudgetsConfig, LedgerConfig, PricesConfig, budget_workers


def _some(what: str, empty: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        if not isinstance(value, (list, tuple) if what == "a list of routes" else dict):
            raise fail(f"expected {what}, got {describe(value)}")
        if not value:
            raise fail(empty)
        return value

    return in_file(check)


def _mapping(value: Any) -> Any:
    if value is None:
        raise fail("expected a mapping, got null (empty)")
    return value


def _defaults(value: Any) -> Any:
    """`ledger:` (or `prices:`) with nothing under it: every default."""
    return {} if value is None else value


@section
class Config(Section):
    """A policy file: the sidecar's and Envoy's settings, providers, routes and policy."""

    derived = ("path",)
    required = ("providers", "routes")
    missing = "required section is missing"

    path: SkipJsonSchema[str]
    server: ServerConfig = Field(default_factory=ServerConfig)
    envoy: EnvoyConfig = Field(default_factory=EnvoyConfig)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    providers: Annotated[
        dict[str, ProviderConfig],
        entries("a mapping of provider name -> settings", ProviderConfig, name),
        _some("a mapping of provider name -> settings", "expected at least one provider"),
    ] = Field(default_factory=dict)
    """Upstream LLM APIs, by name."""
    routes: Annotated[
        tuple[RouteConfig, ...], _some("a list of routes", "expected at least one route")
    ] = ()
    """Path prefixes on the Envoy listener, matched top to bottom: the first match wins,
    any other path gets a 404 JSON error."""
    consumers: Annotated[
        dict[str, ConsumerConfig],
        entries("a mapping of consumer name -> settings", ConsumerConfig, name, empty_ok=True),
    ] = Field(default_factory=dict)
    """Who may call, by name."""
    auth: AuthConfig = Field(default_factory=AuthConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    rate_limits: Annotated[RateLimitsConfig | None, in_file(_mapping)] = None
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    prices: Annotated[PricesConfig | None, in_file(_defaults)] = None
    """Cost of every exchange ([spend.md](spend.md#prices)); set (or `budgets:` or
    `ledger:`) turns spend accounting on."""
    budgets: Annotated[BudgetsConfig | None, in_file(_mapping)] = None
    """Budgets in USD ([spend.md](spend.md#budgets))."""
    ledger: Annotated[LedgerConfig | None, in_file(_defaults)] = None
    """One row per exchange ([spend.md](spend.md#the-ledger))."""

    @property
    def spend(self) -> bool:
        """Spend accounting is on: any of prices, budgets, ledger is set."""
        return self.prices is not None or self.budgets is not None or self.ledger is not None

    def route(self, name: str) -> RouteConfig | None:
        for route in self.routes:
            if route.name == name:
                return route
        return None


SECTIONS = tuple(key for key in Config.__pydantic_fields__ if key not in Config.derived)

# Checks of settings that hold only within one process, for a run with `workers`
# processes; each returns (key, reason) pairs: an in-process rate-limit store cannot
# keep one limit across workers, so it refuses workers > 1.
WorkerCheck = Callable[[Config, int], list[tuple[str, str]]]
WORKER_CHECKS: list[WorkerCheck] = [rate_limit_workers, budget_workers]


def check_workers(config: Config, workers: int) -> list[tuple[str, str]]:
    """Problems with running `config` in `workers` processes (`server.workers` or --workers)."""
    problems: list[tuple[str, str]] = []
    if workers > 1:
        for key, address in (
            ("server.grpc_listen", config.server.grpc_listen),
            ("envoy.sidecar_address", config.envoy.sidecar_address),
        ):
            if address is None:
                continue
            last = worker_addresses(address, workers)[-1]
            path = unix_socket_path(last)
            if path is None and int(last.rpartition(":")[2]) > 65535:
                problems.append(
                    (key, f"{workers} workers need ports up to {last.rpartition(':')[2]}")
                )
            elif path is not None and len(path.encode()) > UNIX_PATH_MAX:
                problems.append((key, f"worker socket {path} is longer than {UNIX_PATH_MAX} bytes"))
    for check in WORKER_CHECKS:
        problems += check(config, workers)
    return problems
