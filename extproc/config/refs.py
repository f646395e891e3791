"""Checks across entries, in a pass of their own over the file as written: names are
unique, references resolve (a route's provider, a limit's consumers, a guard's routes),
routes are reachable, no key is given twice.

A reference whose own value was already refused is not checked again, and a section
that is missing or broken is reported once, where it is, not at every reference."""

from __future__ import annotations

import hashlib
from typing import Any

from extproc.config.access import sha256_hex
from extproc.config.base import Loc
from extproc.config.routing import route_covers

Problems = list[tuple[Loc, str]]


def _names(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [value]
    return value if isinstance(value, list) else []


def _mappings(value: Any) -> list[tuple[int, dict[str, Any]]]:
    items = value if isinstance(value, list) else []
    return [(index, item) for index, item in enumerate(items) if isinstance(item, dict)]


def check_document(document: dict[str, Any], errors: set[Loc]) -> Problems:
    """Every cross-entry problem of `document`; `errors` are the locations already refused."""

    def refused(loc: Loc) -> bool:
        return any(error[: len(loc)] == loc for error in errors)

    raw_providers = document.get("providers")
    providers = [str(p) for p in raw_providers] if isinstance(raw_providers, dict) else []
    raw_consumers = document.get("consumers")
    consumers = [str(c) for c in raw_consumers] if isinstance(raw_consumers, dict) else None
    raw_routes = document.get("routes")
    routes = (
        [str(r["name"]) for _, r in _mappings(raw_routes) if "name" in r]
        if isinstance(raw_routes, list)
        else None
    )
    found: Problems = []

    def provider(loc: Loc, value: Any, empty_too: bool = False) -> None:
        """A provider name; routes skip the check when providers is empty (reported)."""
        if not (providers or (empty_too and isinstance(raw_providers, dict))):
            return
        if isinstance(value, str) and value not in providers and not refused(loc):
            known = ", ".join(providers) or "none"
            found.append((loc, f"unknown provider '{value}' (known: {known})"))

    def names(loc: Loc, value: Any, kind: str, known: list[str] | None) -> None:
        if refused(loc) or (kind == "route" and known is None):
            return
        for index, item in enumerate(_names(value)):
            if known is None or item not in known:
                if kind == "consumer":
                    shown = ", ".join(known) if known else "none: there is no consumers: section"
                else:
                    shown = ", ".join(known or ()) or "none"
                found.append(((*loc, index), f"unknown {kind} '{item}' (known: {shown})"))

    found += _routes(raw_routes, refused)
    for index, route in _mappings(raw_routes):
        provider(("routes", index, "provider"), route.get("provider"))
    found += _consumer_keys(raw_consumers, refused)
    models = document.get("models")
    if isinstance(models, dict):
        aliases = models.get("aliases")
        for alias, spec in aliases.items() if isinstance(aliases, dict) else ():
            at = ("models", "aliases", str(alias))
            if isinstance(spec, dict) and "model" in spec and not refused((*at, "model")):
                provider((*at, "provider"), spec.get("provider"), empty_too=True)
            targets = spec.get("targets") if isinstance(spec, dict) else None
            for index, target in _mappings(targets):
                if "model" in target and not refused((*at, "targets", index, "model")):
                    where = (*at, "targets", index, "provider")
                    provider(where, target.get("provider"), empty_too=True)
        catalog = models.get("catalog")
        for name in (
            catalog if isinstance(catalog, dict) and isinstance(raw_providers, dict) else ()
        ):
            if name != "*" and name not in providers:
                found.append((("models", "catalog", str(name)), f"unknown provider '{name}'"))
    limits = document.get("rate_limits")
    for index, limit in _mappings(limits.get("limits") if isinstance(limits, dict) else None):
        match = limit.get("match")
        if isinstance(match, dict):
            at = ("rate_limits", "limits", index, "match")
            names((*at, "consumers"), match.get("consumers"), "consumer", consumers)
            names((*at, "routes"), match.get("routes"), "route", routes)
    guards = document.get("guards")
    for index, rule in _mappings(guards.get("rules") if isinstance(guards, dict) else None):
        at = ("guards", "rules", index)
        names((*at, "routes"), rule.get("routes"), "route", routes)
        for key in ("consumers", "except_consumers"):
            names((*at, key), rule.get(key), "consumer", consumers)
    found += _budgets(document, consumers, routes, refused)
    return found


def _budgets(
    document: dict[str, Any], consumers: list[str] | None, routes: list[str] | None, refused: Any
) -> Problems:
    """A budget's `match` names a consumer, team or route the policy has (a model is
    checked once the policy is valid: a price may make it known)."""
    budgets = document.get("budgets")
    items = budgets.get("items") if isinstance(budgets, dict) else None
    if not isinstance(items, dict):
        return []
    raw_consumers = document.get("consumers")
    teams: set[str] = set()
    for spec in raw_consumers.values() if isinstance(raw_consumers, dict) else ():
        written = spec.get("teams") if isinstance(spec, dict) else None
        teams.update(t for t in _names(written) if isinstance(t, str))
    auth = document.get("auth")
    jwt = auth.get("jwt") if isinstance(auth, dict) else None
    open_teams = isinstance(jwt, dict) and bool(jwt.get("team_claim"))
    known = {
        "consumer": consumers,
        "team": None if open_teams else sorted(teams),
        "route": routes,
    }
    found: Problems = []
    for name, item in items.items():
        if not isinstance(item, dict):
            continue
        scope, match = item.get("scope"), item.get("match")
        at = ("budgets", "items", str(name), "match")
        if scope not in known or not isinstance(match, str) or refused(at):
            continue
        names = known[scope]
        if scope == "team" and open_teams:
            continue
        if scope == "route" and names is None:
            continue  # routes are broken: reported there
        if match not in (names or ()):
            if scope == "consumer" and not names:
                shown = "none: there is no consumers: section"
            elif scope == "team" and not names:
                shown = "none: no consumer lists teams, and auth.jwt has no team_claim"
            else:
                shown = ", ".join(names or ()) or "none"
            found.append((at, f"unknown {scope} '{match}' (known: {shown})"))
    return found


def _routes(raw: Any, refused: Any) -> Problems:
    """Route names are unique; no route is shadowed by an earlier one."""
    found: Problems = []
    seen: dict[str, int] = {}
    valid: list[tuple[int, dict[str, Any]]] = []
    for index, route in _mappings(raw):
        name = route.get("name")
        if isinstance(name, str) and not refused(("routes", index, "name")):
            if name in seen:
                found.append(
                    (
                        ("routes", index, "name"),
                        f"duplicate route name '{name}' (also routes[{seen[name]}])",
                    )
                )
            else:
                seen[name] = index
        keys = ("name", "prefix", "provider")
        if all(k in route and not refused(("routes", index, k)) for k in keys):
            valid.append((index, route))
    for position, (index, route) in enumerate(valid):
        for earlier_index, earlier in valid[:position]:
            if route_covers(earlier["prefix"], route["prefix"]):
                found.append(
                    (
                        ("routes", index, "prefix"),
                        f"unreachable: routes[{earlier_index}] ('{earlier['name']}', prefix "
                        f"'{earlier['prefix']}') comes first and matches every path of "
                        f"'{route['prefix']}'",
                    )
                )
                break
    return found


def _consumer_keys(raw: Any, refused: Any) -> Problems:
    """The same key material (value, digest, env var, file) under two keys."""
    found: Problems = []
    seen: dict[tuple[str, str], str] = {}
    for consumer, spec in raw.items() if isinstance(raw, dict) else ():
        keys = spec.get("keys") if isinstance(spec, dict) else None
        for index, key in _mappings(keys):
            loc = ("consumers", str(consumer), "keys", index)
            if refused(loc):
                continue
            digest = ""
            if isinstance(key.get("value"), str):
                digest = hashlib.sha256(key["value"].encode()).hexdigest()
            elif isinstance(key.get("sha256"), str):
                digest = sha256_hex(key["sha256"])
            where = f"consumers.{consumer}.keys[{index}]"
            for material in (
                ("digest", digest),
                ("env", key.get("env")),
                ("file", key.get("file")),
            ):
                if not material[1]:
                    continue
                if material in seen:
                    found.append((loc, f"the same key is also given at {seen[material]}"))
                seen.setdefault(material, where)  # type: ignore[arg-type]
    return found
