"""What one exchange costs, from the neutral usage and a price catalog (sans-I/O).

The catalog is the `genai-prices` package's bundled snapshot, read once at start and
never refreshed: its `UpdatePrices` (the only code in it that downloads) is never
used, so pricing is offline and the same on every replica. Overrides from the policy
replace or extend catalog entries per provider/model.

Arithmetic is integral: a rate of $R per 1M tokens is R micro-dollars per token, kept
as pico-dollars per token (R x 1e6, exact for rates with up to six decimals). A cost is
the sum of tokens x rate in pico-dollars, so no float ever drifts; `micros` rounds it
half up to the micro-dollar, the unit of budgets and the ledger.

The neutral usage counts cached reads and cache writes inside `prompt_tokens`, and
reasoning inside `completion_tokens` (see extproc/usage.py), so each kind is priced
once: input = prompt - cached - cache_write, output = completion - reasoning.
Tiers follow the catalog's "cliff" model: past a tier's prompt-token threshold every
token of the exchange pays the tier's rates.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

from extproc.usage import Usage

log = logging.getLogger("extproc.spend")

PICO_PER_MICRO = 1_000_000
# Our wire formats (config `format`) -> the catalog's provider ids.
CATALOG_PROVIDERS = {
    "openai": "openai",
    "azure": "azure",
    "anthropic": "anthropic",
    "gemini": "google",
    "vertex": "google",
    "bedrock": "aws",
}
MAX_CACHED = 65536  # model names come from clients: never an unbounded cache
MAX_LOGGED = 4096


class Unpriced(LookupError):
    """No price for this model and the policy says `unpriced: refuse`."""

    def __init__(self, provider: str, model: str) -> None:
        super().__init__(f"no price for model {model!r} of provider {provider!r}")
        self.provider = provider
        self.model = model


def picos(usd_per_million: Decimal | int | float | str) -> int:
    """$ per 1M tokens -> pico-dollars per token; refuses what it cannot keep exact."""
    value = Decimal(str(usd_per_million)) * PICO_PER_MICRO
    if value < 0 or value != value.to_integral_value():
        raise ValueError(f"price {usd_per_million} per 1M tokens: at most 6 decimals, >= 0")
    return int(value)


@dataclass(frozen=True, slots=True)
class Rates:
    """Pico-dollars per token of each kind (= $ per 1M tokens x 1e6)."""

    input: int
    output: int
    cached: int
    cache_write: int
    reasoning: int

    @classmethod
    def per_million(
        cls,
        input: Decimal | float | str,
        output: Decimal | float | str,
        cached: Decimal | float | str | None = None,
        cache_write: Decimal | float | str | None = None,
        reasoning: Decimal | float | str | None = None,
    ) -> Rates:
        """From $ per 1M tokens; a cache read or write without its own price pays
        the input rate, reasoning without its own price the output rate."""
        i, o = picos(input), picos(output)
        return cls(
            input=i,
            output=o,
            cached=i if cached is None else picos(cached),
            cache_write=i if cache_write is None else picos(cache_write),
            reasoning=o if reasoning is None else picos(reasoning),
        )


@dataclass(frozen=True, slots=True)
class Price:
    """A model's rates, with tiers: (prompt tokens above which they apply, rates),
    ascending."""

    base: Rates
    tiers: tuple[tuple[int, Rates], ...] = ()
    source: str = "catalog"  # catalog | override

    def rates_for(self, prompt_tokens: int) -> Rates:
        rates = self.base
        for start, tier in self.tiers:
            if prompt_tokens > start:
                rates = tier
        return rates


Status = Literal["priced", "estimated", "unpriced"]


@dataclass(frozen=True, slots=True)
class Cost:
    """The cost of one exchange (or a worst case), exact in pico-dollars."""

    picos: int
    status: Status = "priced"
    priced_as: str = ""  # the model whose price was used (another one when estimated)

    @property
    def micros(self) -> int:
        return (self.picos + PICO_PER_MICRO // 2) // PICO_PER_MICRO

    @property
    def usd(self) -> Decimal:
        return Decimal(self.picos).scaleb(-12)


def cost_of(usage: Usage, price: Price) -> int:
    """Pico-dollars for this usage at this price: each token kind at its own rate."""
    prompt = usage.prompt_tokens
    cached = min(usage.cached_tokens, prompt)
    cache_write = min(usage.cache_write_tokens, prompt - cached)
    reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
    r = price.rates_for(prompt)
    return (
        (prompt - cached - cache_write) * r.input
        + cached * r.cached
        + cache_write * r.cache_write
        + (usage.completion_tokens - reasoning) * r.output
        + reasoning * r.reasoning
    )


def worst_case_of(prompt_tokens: int, max_output_tokens: int, price: Price) -> int:
    """Pico-dollars a request can cost at most, for a reservation: every prompt token
    at the dearest input rate (a cache write costs more than plain input), every
    output token at the dearer of output and reasoning."""
    r = price.rates_for(prompt_tokens)
    return prompt_tokens * max(r.input, r.cache_write) + max_output_tokens * max(
        r.output, r.reasoning
    )


@dataclass(frozen=True, slots=True)
class Override:
    """A price from the policy for one model (of one provider, or of any when None)."""

    model: str
    price: Price
    provider: str | None = None


@dataclass(slots=True)
class PriceBook:
    """Resolves (provider, model) to a price once, then answers from a dict.

    `unpriced` is the policy for a model with no price: "refuse" raises Unpriced,
    "zero" costs nothing, "estimate-from:<model>" prices it as that model. Every
    lookup is counted by status in `lookups`; an unpriced model is logged once.
    """

    overrides: Iterable[Override] = ()
    unpriced: str = "zero"
    catalog: bool = True
    on_lookup: Callable[[str], None] | None = None  # status -> (a metric, later)
    lookups: Counter = field(default_factory=Counter)
    _overrides: dict[tuple[str | None, str], Price] = field(default_factory=dict)
    _cache: dict[tuple[str, str, str], tuple[Price | None, Status, str]] = field(
        default_factory=dict
    )
    _logged: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        for o in self.overrides:
            self._overrides[(o.provider, o.model.lower())] = o.price
        self.overrides = tuple(self.overrides)
        if self.unpriced not in ("refuse", "zero") and not self.unpriced.startswith(
            "estimate-from:"
        ):
            raise ValueError(
                f"unpriced: expected refuse, zero or estimate-from:<model>, got {self.unpriced!r}"
            )
        if self.unpriced.startswith("estimate-from:"):
            stand_in = self.unpriced.split(":", 1)[1].strip()
            if not stand_in or self._find("", stand_in, "") is None:
                raise ValueError(f"unpriced: estimate-from {stand_in!r} has no price itself")

    def price(self, provider: str, model: str, wire_format: str = "") -> tuple[Price, Status, str]:
        """(price, status, model priced as); raises Unpriced under `refuse`."""
        key = (provider, model, wire_format)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._resolve(provider, model, wire_format)
            if len(self._cache) < MAX_CACHED:
                self._cache[key] = hit
        found, status, priced_as = hit
        self.lookups[status] += 1
        if self.on_lookup is not None:
            self.on_lookup(status)
        if found is None:
            raise Unpriced(provider, model)
        return found, status, priced_as

    def cost(self, provider: str, model: str, usage: Usage, wire_format: str = "") -> Cost:
        found, status, priced_as = self.price(provider, model, wire_format)
        return Cost(cost_of(usage, found), status, priced_as)

    def worst_case(
        self,
        provider: str,
        model: str,
        prompt_tokens: int,
        max_output_tokens: int,
        wire_format: str = "",
    ) -> Cost:
        found, status, priced_as = self.price(provider, model, wire_format)
        return Cost(worst_case_of(prompt_tokens, max_output_tokens, found), status, priced_as)

    # -- resolution ----------------------------------------------------------------------

    def _resolve(
        self, provider: str, model: str, wire_format: str
    ) -> tuple[Price | None, Status, str]:
        found = self._find(provider, model, wire_format)
        if found is not None:
            return found, "priced", model
        if (provider, model) not in self._logged and len(self._logged) < MAX_LOGGED:
            self._logged.add((provider, model))
            log.warning(
                "no price for model %r of provider %r: unpriced policy %r applies",
                model,
                provider,
                self.unpriced,
            )
        if self.unpriced == "zero":
            return ZERO, "unpriced", model
        if self.unpriced.startswith("estimate-from:"):
            stand_in = self.unpriced.split(":", 1)[1].strip()
            return self._find(provider, stand_in, wire_format), "estimated", stand_in
        return None, "unpriced", model

    def _find(self, provider: str, model: str, wire_format: str) -> Price | None:
        lowered = model.lower()
        override = self._overrides.get((provider, lowered)) or self._overrides.get((None, lowered))
        if override is not None:
            return override
        if not self.catalog:
            return None
        return catalog_price(provider, model, wire_format)


ZERO = Price(Rates(0, 0, 0, 0, 0), source="zero")


def _snapshot():  # the bundled one only: never a downloaded update
    from genai_prices import data_snapshot

    return data_snapshot._bundled_snapshot()


def catalog_price(provider: str, model: str, wire_format: str = "") -> Price | None:
    """The bundled catalog's price for this model: tried under the catalog provider of
    the wire format, then the provider's own name, then any provider whose models
    match. None when the catalog has no token price for it."""
    snapshot = _snapshot()
    candidates = [CATALOG_PROVIDERS.get(wire_format), CATALOG_PROVIDERS.get(provider), provider]
    seen: set[str | None] = set()
    for provider_id in [*candidates, None]:
        if provider_id in seen or (provider_id is not None and not provider_id):
            continue
        seen.add(provider_id)
        try:
            _, info = snapshot.find_provider_model(model, None, provider_id, None)
        except LookupError:
            continue
        return _from_catalog(info.get_prices(datetime.now(tz=UTC)))
    return None


_CATALOG_FIELDS = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cached": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
    "reasoning": "output_reasoning_mtok",
}


def _from_catalog(model_price: object) -> Price | None:
    """A catalog ModelPrice (Decimals or TieredPrices per kind) -> Price, its tiers
    flattened: one full set of rates per threshold any kind has."""
    values = {kind: getattr(model_price, key, None) for kind, key in _CATALOG_FIELDS.items()}
    if values["input"] is None or values["output"] is None:
        return None  # priced per request, per image, per second: not a token model

    def at(value: object, prompt_tokens: int) -> Decimal | None:
        if value is None or isinstance(value, Decimal):
            return value
        chosen = value.base  # TieredPrices: the highest tier passed applies to all
        for tier in value.tiers:
            if prompt_tokens > tier.start:
                chosen = tier.price
        return chosen

    def rates(prompt_tokens: int) -> Rates:
        return Rates.per_million(**{k: at(v, prompt_tokens) for k, v in values.items()})

    starts = sorted(
        {
            t.start
            for v in values.values()
            if v is not None and not isinstance(v, Decimal)
            for t in v.tiers
        }
    )
    return Price(rates(0), tuple((s, rates(s + 1)) for s in starts))
