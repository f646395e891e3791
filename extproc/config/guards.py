"""Guards: sensitive text in requests and answers ([guards.md](guards.md))."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field

from extproc.config.base import Loc, Section, describe, fail, section, several, unknown_key
from extproc.config.types import (
    Bool,
    EnvName,
    Int,
    Name,
    Names,
    Optional,
    OptStr,
    checked,
    choice,
    in_file,
    listed,
    name_list,
    one_or_list,
    string,
    url,
)
from extproc.patterns import BUILTIN_NAMES, PatternError, compile_re2, expand

GUARD_ACTIONS = ("mask", "reject", "log")
GUARD_PHASES = ("request", "response")
_GUARD_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _regex(value: Any) -> str:
    try:
        if compile_re2(string(value)).fullmatch("") is not None:
            raise PatternError("it matches the empty string")
    except PatternError as exc:
        raise fail(str(exc)) from None
    return value


def _mask_token(value: Any) -> str:
    if not isinstance(value, str):
        raise fail(f"expected a string (may be empty), got {describe(value)}")
    if len(value) > 200:
        raise fail("longer than 200 characters")
    return value


MaskToken = Annotated[str, in_file(_mask_token), Field(max_length=200)]


@section
class GuardPatternConfig(Section):
    """An operator's RE2 pattern; `name` upper-cased is its type (`<EMPLOYEE_ID>`)."""

    name: Name
    regex: checked(_regex)
    """RE2 syntax: linear time whatever it says; must not match the empty string."""
    mask_token: Annotated[str | None, in_file(_mask_token)] = None
    """Overrides the guard's `mask_token` for this pattern."""
    max_length: Optional(Int(1, 1 << 20), "an integer") = None
    """The longest match, when RE2 syntax hides it."""


def _code(value: Any) -> str:
    if not _GUARD_CODE.fullmatch(string(value)):
        raise fail(f"expected letters, digits, '_', '.', '-', got {describe(value)}")
    return value


@section
class GuardRejectConfig(Section):
    """What a client gets when a reject guard fires (never the matched text)."""

    status: Int(400, 599) = 403
    message: OptStr = None
    """Unset: "Request (Response) blocked by guard 'NAME'."."""
    code: checked(_code) = "guard_blocked"
    """The error's `code`."""


_any_url = url(
    ("http", "https", "grpc", "grpcs"), "http(s)://host[:port]/path or grpc(s)://host:port"
)


def _webhook_url(value: Any) -> str:
    scheme = urlsplit(value).scheme if isinstance(value, str) else ""
    if scheme in ("http", "https", "grpc", "grpcs") and not urlsplit(value).hostname:
        raise fail(
            f"expected http(s)://host[:port]/path or grpc(s)://host:port, got {describe(value)}"
        )
    parts = _any_url(value)
    if parts.scheme.startswith("grpc") and (parts.port is None or parts.path not in ("", "/")):
        raise fail("a grpc(s):// URL is host:port only (the service is fixed)")
    return value


@section
class GuardWebhookConfig(Section):
    """An external checker: `http(s)://...` gets JSON, `grpc(s)://host:port` the gRPC form."""

    url: checked(_webhook_url)
    timeout_ms: Int(1, 60_000) = 500
    failure: choice(("open", "closed"), "failure mode") = "closed"
    """`closed`: refuse (503) when it fails; `open`: let the request through."""
    api_key_env: EnvName = None
    """Sent as `authorization: Bearer ...`."""


def _phases(value: Any) -> tuple[str, ...]:
    names = name_list(value)
    for phase in names:
        if phase not in GUARD_PHASES:
            raise fail(f"unknown phase '{phase}' (known: {', '.join(GUARD_PHASES)})")
    return names


def _detectors(value: Any) -> tuple[str, ...]:
    names = name_list(value)
    for index, detector in enumerate(names):
        if detector not in BUILTIN_NAMES:
            at: Loc = (index,) if isinstance(value, list | tuple) else ()
            raise several([(at, unknown_key(detector, BUILTIN_NAMES, "detector"))])
    return tuple(expand(names))


def _keywords(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise fail(f"expected a non-empty list of strings, got {describe(value)}")
    for index, item in enumerate(value):
        try:
            string(item)
        except Exception as exc:
            raise several([((index,), str(exc))]) from None
    return tuple(dict.fromkeys(value))


@section
class GuardConfig(Section):
    """One guard: what to look for, what to do, where (phase, route, consumer)."""

    name: Name
    """Unique; in metrics, logs and the `x-ai-gateway-guard` header."""
    action: choice(GUARD_ACTIONS, "action") = "mask"
    phases: Annotated[
        checked(_phases, tuple[Literal[GUARD_PHASES], ...]),  # type: ignore[valid-type]
        one_or_list({"enum": list(GUARD_PHASES), "type": "string"}),
    ] = ("request", "response")
    """Where the guard applies (a webhook guard: requests only)."""
    detectors: Annotated[
        checked(_detectors, tuple[str, ...]),
        one_or_list({"enum": list(BUILTIN_NAMES), "type": "string"}),
    ] = ()
    """Built-in detectors and aliases (`pii`, `secrets`, `ip_address`), expanded."""
    patterns: Annotated[tuple[GuardPatternConfig, ...], listed("a non-empty list of patterns")] = ()
    keywords: checked(_keywords, tuple[str, ...]) = ()
    """Literal phrases, matched as whole words."""
    case_sensitive: Bool = False
    """For `keywords`."""
    mask_token: MaskToken = "<{type}>"
    """The replacement; `{type}` is the finding's type."""
    reject: GuardRejectConfig = Field(default_factory=GuardRejectConfig)
    routes: Names = ()
    """Empty: every route."""
    consumers: Names = ()
    """Empty: everyone (anonymous included)."""
    except_consumers: Names = ()
    webhook: Optional(GuardWebhookConfig, "a mapping") = None

    @classmethod
    def prepare(cls, raw: dict[str, Any]) -> dict[str, Any]:
        if "webhook" in raw and "phases" not in raw:
            raw = {**raw, "phases": ["request"]}
        return raw

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        found: list[tuple[Loc, str]] = []
        finds = [key for key in ("detectors", "patterns", "keywords") if key in raw]
        if "webhook" in raw:
            if finds:
                found.append(
                    ((), f"a webhook guard does its own detection; remove {', '.join(finds)}")
                )
            if "action" in raw:
                found.append((("action",), "a webhook decides the action (pass, mask, reject)"))
            phases = raw.get("phases", ())
            if "response" in ([phases] if isinstance(phases, str) else phases or ()):
                found.append(
                    (
                        ("phases",),
                        "a webhook guard checks requests only (a call per streamed chunk "
                        "would stall the stream)",
                    )
                )
        elif not finds:
            found.append(((), "set detectors, patterns, keywords or webhook (what to look for)"))
        if "case_sensitive" in raw and "keywords" not in raw:
            found.append((("case_sensitive",), "only meaningful with keywords"))
        if "consumers" in raw and "except_consumers" in raw:
            found.append(((), "set consumers or except_consumers, not both"))
        return found


def _budget_status(value: Any) -> int:
    """413 (too large to check) or 400 (a bad request): what a client can act on."""
    if isinstance(value, bool) or value not in (400, 413):
        raise fail(f"expected 413 or 400, got {describe(value)}")
    return value


@section
class GuardsConfig(Section):
    """Guards and the budget every scan gets."""

    required = ("rules",)

    rules: Annotated[tuple[GuardConfig, ...], listed("a non-empty list of guards")] = ()
    """The guards (required when the section is present)."""
    max_holdback_chars: Int(64, 1 << 20) = 16384
    """Streams: the most text held back per channel while it could still become a match
    (a PEM private key is the longest built-in, about 12 000 characters)."""
    # A 1 MiB body (the default envoy.max_request_bytes) holds at most 1 Mi characters:
    # 2 Mi never refuse such a body on size. Every built-in detector at once costs
    # 0.2-0.9 µs per character on ordinary or numeric text (dates) and 2-4 µs on the
    # worst input measured, `4 4 4 ...` (bench/adversarial_bench.py): 1 s admits any
    # ordinary 1 MiB prompt and refuses the hostile one, below Envoy's 2 s message
    # timeout so the refusal arrives before Envoy gives up.
    scan_budget_chars: Int(1024, 1 << 30) = 2 << 20
    """Per request (prompt texts) and per response frame: more characters than this are
    refused with `scan_budget_status` (code guard_budget_exceeded) instead of stalling
    the worker's other streams."""
    scan_budget_ms: Int(1, 60_000) = 1000
    """The same for a scan that takes longer than this."""
    scan_budget_status: Annotated[Literal[413, 400], in_file(_budget_status)] = 413
    """413 (too large to check) or 400 (a bad request)."""

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        found: list[tuple[Loc, str]] = []
        names: dict[str, int] = {}
        rules = raw.get("rules")
        for index, rule in enumerate(rules if isinstance(rules, list) else ()):
            name = rule.get("name") if isinstance(rule, dict) else None
            if not isinstance(name, str):
                continue
            if name in names:
                found.append(
                    (
                        ("rules", index, "name"),
                        f"duplicate guard name '{name}' (also guards.rules[{names[name]}])",
                    )
                )
            names[name] = index
        return found
