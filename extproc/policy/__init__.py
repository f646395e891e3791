"""The policy snapshot every exchange runs under: config, resolved secrets, stages.

A new `Policy` is built on every (re)load and swapped whole; an exchange keeps the one
it started with, so streams in flight finish under their own rules. What must outlive
a reload (rate-limit counters, JWKS caches, connections) lives in `Shared`, which is
made once per process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from extproc.config import Config
from extproc.policy.stage import Refusal, RequestContext, Stage, StreamBlocked, StreamFilter

__all__ = [
    "Policy",
    "Refusal",
    "RequestContext",
    "Shared",
    "Stage",
    "StreamBlocked",
    "StreamFilter",
    "build_policy",
    "stage_builders",
]

log = logging.getLogger("extproc.policy")
T = TypeVar("T")


class Shared:
    """Process-wide objects that survive policy reloads, made on first use."""

    def __init__(self) -> None:
        self._items: dict[str, Any] = {}

    def get(self, key: str, factory: Callable[[], T]) -> T:
        if key not in self._items:
            self._items[key] = factory()
        return self._items[key]

    def values(self) -> list[Any]:
        return list(self._items.values())


@dataclass(frozen=True, slots=True)
class Policy:
    config: Config
    provider_keys: dict[str, str] = field(default_factory=dict, repr=False)
    stages: tuple[Stage, ...] = ()


# Each builder turns the config into a stage (or None when its section is absent).
StageBuilder = Callable[[Config, Shared, Mapping[str, str]], Stage | None]


def stage_builders() -> list[StageBuilder]:
    """In the order stages run: who is calling (auth), what they may use (models), what
    they send and get (guards), how much (limits). One line per stage module."""
    return []


def provider_keys(config: Config, environ: Mapping[str, str]) -> dict[str, str]:
    """Provider credentials, read at load time (never on the request path)."""
    keys: dict[str, str] = {}
    for name, provider in config.providers.items():
        key = environ.get(provider.api_key_env) if provider.api_key_env else None
        if not key and provider.api_key_file:
            try:
                key = Path(provider.api_key_file).read_text().strip()
            except OSError as exc:
                log.warning("provider %s: cannot read api_key_file: %s", name, exc.strerror)
        if key:
            keys[name] = key
    return keys


def build_policy(
    config: Config, shared: Shared | None = None, environ: Mapping[str, str] | None = None
) -> Policy:
    env = os.environ if environ is None else environ
    shared = shared or Shared()
    stages = tuple(
        stage for build in stage_builders() if (stage := build(config, shared, env)) is not None
    )
    return Policy(config=config, provider_keys=provider_keys(config, env), stages=stages)
