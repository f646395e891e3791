"""Failover: an alias's `targets`, the retry settings Envoy is rendered with, and a
provider's own quota ([failover.md](failover.md))."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from extproc.config.base import Loc, Section, fail, section
from extproc.config.limits import _window, window_seconds
from extproc.config.types import Int, Optional, Str, checked, choice, in_file

# Every subset of an alias's targets is one Envoy cluster (a skipped target gets no
# attempt): 2**4 - 1 = 15 clusters at most per alias.
MAX_TARGETS = 4
DEFAULT_RETRIABLE = (429, 500, 502, 503, 504, 529)
BALANCES = ("round_robin", "least_request")


@section
class TargetConfig(Section):
    """One way to serve an alias: a provider and the model it is asked for."""

    provider: Str
    """A name under `providers`."""
    model: Str
    """The model id sent to that provider."""
    weight: Optional(Int(1, 10000), "an integer from 1 to 10000") = None
    """Set on every target of the alias (or none): requests are spread by weight
    instead of tried in order; a failed attempt goes to another target."""


def _statuses(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise fail("expected a non-empty list of HTTP statuses")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 400 <= item <= 599:
            raise fail(f"expected statuses from 400 to 599, got {item!r}")
    return tuple(value)


@section
class FailoverConfig(Section):
    """How an alias with `targets` moves to the next one ([failover.md](failover.md))."""

    empty_ok = True

    first_byte_timeout_ms: Int(100, 3_600_000) = 30000
    """An attempt without response headers in this time is abandoned and the next
    target tried (Envoy's `per_try_timeout`; it never cuts an answer that started)."""
    retry_statuses: Annotated[
        tuple[int, ...], in_file(_statuses), Field(json_schema_extra={"items": {"type": "integer"}})
    ] = DEFAULT_RETRIABLE
    """Statuses that send the request to the next target (connection failures and
    resets before the response always do)."""
    failures_to_skip: Int(1, 1000) = 3
    """Consecutive failed attempts after which a target is skipped."""
    skip_seconds: Int(1, 86400) = 30
    """How long a failing target is skipped; then it is tried again (one success
    clears it, one failure skips it again)."""
    balance: choice(BALANCES, "balance") = "round_robin"
    """How a split (targets with `weight`) chooses: `round_robin` (weighted, exact
    shares) or `least_request` (weighted, the target with fewer requests in flight
    first: the least loaded of equivalent targets)."""


@section
class ProviderLimitsConfig(Section):
    """A provider's own quota (an organisation's RPM/TPM): when it is used up, alias
    targets on this provider are skipped, never tried."""

    requests: Optional(Int(), "an integer") = None
    """Requests per window."""
    tokens: Optional(Int(), "an integer") = None
    """Total tokens (prompt + completion) per window."""
    window: checked(_window) = "1m"
    """`30s`, `1m`, `1h`, `1d` (at most 366d)."""

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        if "requests" not in raw and "tokens" not in raw:
            return [((), "set requests, tokens or both (how much per window)")]
        return []

    @property
    def window_seconds(self) -> int:
        return window_seconds(self.window)


def check_targets(raw: dict[str, Any]) -> list[tuple[Loc, str]]:
    """An alias is `provider` + `model`, or `targets`, never both."""
    found: list[tuple[Loc, str]] = []
    targets = raw.get("targets")
    direct = [key for key in ("provider", "model") if key in raw]
    if targets is None:
        if len(direct) < 2:
            found.append(((), "set provider and model, or targets"))
        return found
    if direct:
        found.append(
            (
                (direct[0],),
                "set provider/model or targets, not both "
                "(targets name their own provider and model)",
            )
        )
    if not isinstance(targets, list) or not targets:
        found.append((("targets",), "expected a non-empty list of {provider, model} targets"))
        return found
    if len(targets) > MAX_TARGETS:
        found.append((("targets",), f"at most {MAX_TARGETS} targets"))
    weighted = [isinstance(t, dict) and "weight" in t for t in targets]
    if any(weighted) and not all(weighted):
        index = weighted.index(False)
        found.append(
            (("targets", index), "set weight on every target or on none (a split, or an order)")
        )
    return found


__all__ = [
    "DEFAULT_RETRIABLE",
    "MAX_TARGETS",
    "FailoverConfig",
    "ProviderLimitsConfig",
    "TargetConfig",
    "check_targets",
]
