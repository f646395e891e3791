"""What failover knows without I/O: an alias's targets, the Envoy cluster for each set
of usable targets, how an attempt names its target, and the circuit state that skips
a target that keeps failing.

Envoy does the attempts (retry policy, per-try timeout, priorities or weights); a set
of targets is one cluster, and the router-level sidecar picks the set (a skipped
target gets no attempt, which an upstream filter cannot do: Envoy does not retry its
immediate response). See docs/design.md, "Failover through Envoy".
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from extproc.config import AliasConfig, Config

FAILOVER_HEADER = "x-ai-gateway-failover"  # alias/mask: the route of that target set
TARGET_HEADER = "x-ai-gateway-target"  # set on the response by the upstream filter
# In the request body, for the attempts: the client's API and path (an attempt's own
# header changes stay for the next one, the body is the original each time). Each
# attempt takes it out; it never reaches a provider.
STASH_KEY = "x-ai-gateway"
METADATA_KEY = "ai_gateway"  # endpoint metadata: alias, target index
UPSTREAM_STAGE = "x-ai-gateway-stage"  # gRPC metadata of the upstream ext_proc filter
UPSTREAM = "upstream"
_SAFE = re.compile(r"[A-Za-z0-9._-]{1,100}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True, slots=True)
class Target:
    alias: str
    index: int
    provider: str
    model: str
    weight: int | None

    @property
    def label(self) -> str:
        """`provider/model`: the metric label and the access log's `target`."""
        return f"{self.provider}/{self.model}"


def targets_of(alias: AliasConfig) -> tuple[Target, ...]:
    return tuple(
        Target(alias.name, i, t.provider, t.model, t.weight) for i, t in enumerate(alias.targets)
    )


def failover_aliases(config: Config) -> dict[str, tuple[Target, ...]]:
    """Aliases with `targets`, by name."""
    return {
        name: targets_of(alias) for name, alias in config.models.aliases.items() if alias.targets
    }


def masks(count: int) -> range:
    """Every non-empty set of `count` targets, as a bit mask (bit i: target i)."""
    return range(1, 1 << count)


def members(mask: int, targets: tuple[Target, ...]) -> tuple[Target, ...]:
    return tuple(t for t in targets if mask >> t.index & 1)


def cluster_name(alias: str, mask: int) -> str:
    """`failover_<alias>_<mask>`; an alias with other characters than letters, digits,
    `.`, `-` and `_` is spelt safely (its own hash keeps two such aliases apart)."""
    if not _SAFE.fullmatch(alias):
        digest = hashlib.sha256(alias.encode()).hexdigest()[:8]
        alias = f"{_UNSAFE.sub('_', alias)[:40]}_{digest}"
    return f"failover_{alias}_{mask}"


def route_value(alias: str, mask: int) -> str:
    return f"{alias}/{mask}"


@dataclass(slots=True)
class Circuit:
    failures: int = 0
    open_until: float = 0.0


@dataclass(slots=True)
class Circuits:
    """Consecutive failures per target; `failures_to_skip` in a row skips the target
    for `skip_seconds`, then it is tried again (a success closes it, one more failure
    opens it again). Per process: each worker learns from the attempts it sees."""

    failures_to_skip: int
    skip_seconds: float
    state: dict[tuple[str, int], Circuit] = field(default_factory=dict)

    def usable(self, target: Target, now: float) -> bool:
        circuit = self.state.get((target.alias, target.index))
        return circuit is None or circuit.open_until <= now

    def record(self, target: Target, ok: bool, now: float) -> bool:
        """One attempt's outcome; True when this failure opened the circuit."""
        key = (target.alias, target.index)
        if ok:
            self.state.pop(key, None)
            return False
        circuit = self.state.setdefault(key, Circuit())
        circuit.failures += 1
        if circuit.failures >= self.failures_to_skip:
            opened = circuit.open_until <= now
            circuit.open_until = now + self.skip_seconds
            circuit.failures = self.failures_to_skip - 1  # after the pause: one strike
            return opened
        return False
