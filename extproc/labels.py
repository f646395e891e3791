"""Metric label values from the policy's known sets, so a client cannot mint series.

Every label a client can influence (the model it names, the consumer a token claims)
maps to a value the policy declares (aliases and their targets, catalogs, allow-lists,
defaults; declared consumers) or to `other`. 200 made-up model names add one series,
not 200, and a 5,000-character name never becomes a label.

A policy that cannot list its values (a provider without a catalog takes any model
name; a JWT may name any consumer unless `known_consumers_only`) keeps the first
`learn` short, plain names as themselves, then `other`: bounded, and a deployment's
few real models still show by name. A model name is learned only from an exchange
that such a provider answered with anything but 400/404 (a made-up name gets the
provider's "no such model" and stays `other`); a consumer name only from a verified
token.
"""

from __future__ import annotations

import re

from extproc.config import Config

OTHER = "other"
MAX_LABEL_CHARS = 64
LEARN = 50  # names kept per label when the policy cannot list them all
_PLAIN = re.compile(rf"[A-Za-z0-9._:/@+-]{{1,{MAX_LABEL_CHARS}}}")


class LabelValues:
    """One label's allowed values: declared, learned (bounded), or `other`."""

    __slots__ = ("known", "learn", "learned", "open")

    def __init__(self, known: frozenset[str], *, open: bool, learn: int) -> None:
        self.known = frozenset(k[:MAX_LABEL_CHARS] for k in known)
        self.open = open
        self.learn = learn
        self.learned: set[str] = set()

    def __call__(self, value: str, *, learn: bool = True) -> str:
        """`value` as a label; `learn`: it may become one if the policy allows."""
        if value in self.known or value in self.learned:
            return value
        if learn and self.open and len(self.learned) < self.learn and _PLAIN.fullmatch(value):
            self.learned.add(value)
            return value
        return OTHER


class MetricLabels:
    __slots__ = ("consumer", "model", "open_providers")

    def __init__(
        self, model: LabelValues, consumer: LabelValues, open_providers: frozenset[str]
    ) -> None:
        self.model = model
        self.consumer = consumer
        self.open_providers = open_providers  # providers without a catalog

    @classmethod
    def of(cls, config: Config, learn: int = LEARN) -> MetricLabels:
        models = {"unknown"}  # an exchange that never named one
        m = config.models
        for alias, target in m.aliases.items():
            models.update((alias, *(t.model for t in target.targets)))
            if target.model:
                models.add(target.model)
        for names in m.catalog.values():
            models.update(names)
        lists = [r.models or () for r in config.routes]
        lists += [c.models or () for c in config.consumers.values()]
        models.update(n for names in lists for n in names if "*" not in n)
        models.update(d for d in (m.default, *(r.default_model for r in config.routes)) if d)
        open_providers = frozenset(p for p in config.providers if m.catalog_of(p) is None)
        jwt = config.auth.jwt
        open_consumers = not config.consumers or (jwt is not None and not jwt.known_consumers_only)
        consumers = frozenset({"anonymous", *config.consumers})
        return cls(
            LabelValues(frozenset(models), open=bool(open_providers), learn=learn),
            LabelValues(consumers, open=open_consumers, learn=learn),
            open_providers,
        )
