"""What the policy check needs to know about guard detection, without the detectors:
the built-in detector names and aliases, and RE2 compilation with its reason. A leaf
module, so `extproc.config` validates guards without importing the guard package."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

try:  # google-re2: linear-time matching for operator-supplied patterns
    import re2 as _re2
except ImportError:  # pragma: no cover - a declared dependency
    _re2 = None

# The built-in detectors (extproc.policy.guards.detectors holds their patterns).
DETECTORS: tuple[str, ...] = (
    "credit_card", "us_ssn", "email", "phone", "iban", "ipv4", "ipv6",
    "aws_access_key", "private_key", "bearer_token", "api_key",
)  # fmt: skip
ALIASES: dict[str, tuple[str, ...]] = {
    "ip_address": ("ipv4", "ipv6"),
    "secrets": ("aws_access_key", "private_key", "bearer_token", "api_key"),
    "pii": ("credit_card", "us_ssn", "email", "phone", "iban", "ipv4", "ipv6"),
}
BUILTIN_NAMES: tuple[str, ...] = (*DETECTORS, *ALIASES)


class PatternError(ValueError):
    """A pattern that cannot be used; the message says why (shown at config load)."""


def expand(names: Iterable[str]) -> list[str]:
    """Detector names with aliases (`pii`, `secrets`, `ip_address`) expanded, in order,
    without duplicates."""
    out: list[str] = []
    for name in names:
        for item in ALIASES.get(name, (name,)):
            if item not in out:
                out.append(item)
    return out


def _re2_options() -> Any:
    options = _re2.Options()
    options.log_errors = False  # the reason goes into our error, not to stderr
    return options


def compile_re2(pattern: str) -> Any:
    """Compile with RE2; PatternError carries RE2's reason."""
    if _re2 is None:  # pragma: no cover
        raise PatternError("google-re2 is not installed")
    try:
        return _re2.compile(pattern, _re2_options())
    except Exception as exc:  # re2.error; message is bytes in some versions
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(f"RE2 cannot compile it: {reason}") from None
