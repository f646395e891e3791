"""What a caller may use: model allow-lists, aliases, the default model, `/v1/models`.

The pre-call "validate model" step. A name the client sends is an alias (served as
another model, maybe by another provider), a catalog model (served as is by the
route's provider), any name (for a provider without a catalog) or unknown (404
`model_not_found`, as OpenAI answers). Allow-lists come from the route, the consumer
and, for JWT callers, a claim; each one that is set must allow the model (a list
entry matches the name sent or the real model; `*` is a wildcard). An alias served
by another provider re-routes the request: the sidecar sets `x-ai-gateway-provider`
and clears Envoy's route cache, so one listener serves several providers, and the
credentials follow the provider. A provider of another wire format serves it only
when a translator exists for the pair (`translate.registry`): the exchange then
translates the body, path and answer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import orjson

from extproc.config import AliasConfig, Config, ProviderConfig
from extproc.errors import shown
from extproc.failover.stage import ALIAS_SCRATCH
from extproc.headers import MODEL_HEADER, PROVIDER_HEADER
from extproc.policy import credentials
from extproc.policy.stage import Refusal, RequestContext, Stage
from extproc.providers import format_for
from extproc.translate import registry

MODELS_PATH = "/v1/models"
# Formats whose clients read OpenAI's model list shape.
_LISTS_LIKE_OPENAI = ("openai",)


class Allow:
    """One allow-list: exact names and `*` patterns."""

    __slots__ = ("exact", "patterns")

    def __init__(self, names: tuple[str, ...] | list[str]) -> None:
        self.exact = frozenset(n for n in names if "*" not in n)
        self.patterns = tuple(n for n in names if "*" in n)

    def allows(self, *names: str) -> bool:
        for name in names:
            if name in self.exact:
                return True
            for pattern in self.patterns:
                if fnmatch.fnmatchcase(name, pattern):
                    return True
        return False


def claim_models(value: Any) -> Allow:
    """A JWT claim listing models: a list of strings or one space-separated string.
    Anything else allows nothing (a malformed claim never widens access)."""
    if isinstance(value, str):
        return Allow(value.split())
    if isinstance(value, list):
        return Allow([v for v in value if isinstance(v, str)])
    return Allow(())


class ModelStage(Stage):
    name = "models"

    def __init__(self, config: Config, provider_keys: Mapping[str, str]) -> None:
        self.config = config
        self.providers = config.providers
        self.aliases: dict[str, AliasConfig] = config.models.aliases
        self.catalogs = {
            name: frozenset(names)
            for name in config.providers
            if (names := config.models.catalog_of(name)) is not None
        }
        self.default = config.models.default
        self.provider_keys = provider_keys
        self.translators = registry.build(config.providers, config.streaming.max_frame_bytes)
        self.route_allow = {r.name: Allow(r.models) for r in config.routes if r.models is not None}
        self.route_default = {r.name: r.default_model for r in config.routes if r.default_model}
        self.consumer_allow = {
            name: Allow(c.models) for name, c in config.consumers.items() if c.models is not None
        }
        jwt = config.auth.jwt
        self.models_claim = jwt.models_claim if jwt is not None else None

    # -- who may use what ------------------------------------------------------------

    def _allow_lists(self, ctx: RequestContext) -> list[Allow]:
        lists = []
        route = self.route_allow.get(ctx.route.name)
        if route is not None:
            lists.append(route)
        if ctx.consumer:
            consumer = self.consumer_allow.get(ctx.consumer)
            if consumer is not None:
                lists.append(consumer)
            if self.models_claim and self.models_claim in ctx.claims:
                lists.append(claim_models(ctx.claims[self.models_claim]))
        return lists

    def _resolve(self, ctx: RequestContext, name: str) -> tuple[ProviderConfig, str] | None:
        """(provider, real model) for a name on this route, None when unknown here."""
        alias = self.aliases.get(name)
        if alias is not None and alias.targets:
            # Failover: the failover stage picks the targets; the first names the model.
            for target in alias.targets:
                fmt = self.providers[target.provider].format
                if fmt != ctx.provider.format and (
                    (ctx.format.name, target.provider) not in self.translators
                ):
                    return None  # a target in another API, and no translator to it
            return ctx.provider, alias.targets[0].model
        if alias is not None:
            assert alias.provider is not None and alias.model is not None
            provider = self.providers[alias.provider]
            if provider.format != ctx.provider.format and (
                (ctx.format.name, provider.name) not in self.translators
            ):
                return None  # another API shape, and no translator: not servable here
            return provider, alias.model
        catalog = self.catalogs.get(ctx.provider.name)
        if catalog is None or name in catalog:
            return ctx.provider, name
        return None

    # -- /v1/models --------------------------------------------------------------------

    def on_request_headers(self, ctx: RequestContext) -> None:
        if ctx.method != "GET" or ctx.provider.format not in _LISTS_LIKE_OPENAI:
            return
        path = ctx.upstream_path.split("?", 1)[0]
        if path.rstrip("/") == MODELS_PATH:
            data = [self._model_object(ctx, n) for n in self._visible(ctx)]
            body = orjson.dumps({"object": "list", "data": data})
            raise Refusal(200, "model list", None, kind="models", body=body)
        if path.startswith(MODELS_PATH + "/"):
            name = unquote(path[len(MODELS_PATH) + 1 :])
            if name in self._visible(ctx):
                body = orjson.dumps(self._model_object(ctx, name))
                raise Refusal(200, "model", None, kind="models", body=body)
            raise _not_found(name)

    def _visible(self, ctx: RequestContext) -> list[str]:
        lists = self._allow_lists(ctx)
        names = dict.fromkeys(self.aliases)
        names.update(dict.fromkeys(sorted(self.catalogs.get(ctx.provider.name, ()))))
        for allow in lists:
            names.update(dict.fromkeys(sorted(allow.exact)))
        out = []
        for name in names:
            resolved = self._resolve(ctx, name)
            if resolved is None:
                continue
            if all(allow.allows(name, resolved[1]) for allow in lists):
                out.append(name)
        return sorted(out)

    def _model_object(self, ctx: RequestContext, name: str) -> dict[str, Any]:
        alias = self.aliases.get(name)
        owner = ctx.provider.name
        if alias is not None:
            owner = alias.provider or alias.targets[0].provider
        return {"id": name, "object": "model", "created": 0, "owned_by": owner}

    # -- the request body ----------------------------------------------------------------

    async def on_request(self, ctx: RequestContext) -> None:
        info = ctx.info
        assert info is not None
        name = info.model
        if not name:
            name = self.route_default.get(ctx.route.name) or self.default or ""
            if not name:
                raise Refusal(
                    400,
                    "You must provide a model parameter.",
                    "missing_required_parameter",
                    kind="bad_request",
                    param="model",
                )
        resolved = self._resolve(ctx, name)
        if resolved is None:
            raise _not_found(name)
        provider, model = resolved
        lists = self._allow_lists(ctx)
        if not all(allow.allows(name, model) for allow in lists):
            who = f"the consumer '{shown(ctx.consumer)}'" if ctx.consumer else "anonymous callers"
            raise Refusal(
                403,
                f"The model '{shown(name)}' is not allowed for {who} on this route.",
                "model_not_allowed",
                kind="model_denied",
                param="model",
            )
        if model != info.model:
            if info.model and "model" not in info.body:
                # The API names the model in its path (Gemini, Bedrock, Azure
                # deployments): an alias would need a path rewrite, so it is not served.
                raise _not_found(name)
            info.model = model
            info.body["model"] = model
            ctx.body_dirty = True
        if name in self.aliases and self.aliases[name].targets:
            ctx.scratch[ALIAS_SCRATCH] = name  # the failover stage takes it from here
        elif provider.format != ctx.provider.format:
            self._translate(ctx, provider)
        elif provider.name != ctx.provider.name:
            self._switch(ctx, provider)
        ctx.upstream_headers[PROVIDER_HEADER] = provider.name
        ctx.upstream_headers[MODEL_HEADER] = model

    def _switch(self, ctx: RequestContext, provider: ProviderConfig) -> None:
        """Send the request to `provider` (same wire format) with its own credential."""
        old = ctx.provider
        previous = credentials.provider_headers(
            old, ctx.format, self.provider_keys.get(old.name), ctx.headers
        )
        credentials.apply(
            ctx, provider, ctx.format, self.provider_keys.get(provider.name), previous
        )
        ctx.provider = provider
        ctx.clear_route_cache = True  # Envoy's route for this provider matches the header

    def _translate(self, ctx: RequestContext, provider: ProviderConfig) -> None:
        """Send the request to `provider` in its own API: the exchange translates the
        body after the stages (`ctx.translator`); the credential is the one that API
        carries (Anthropic's `x-api-key`, Gemini's `x-goog-api-key`...)."""
        old = ctx.provider
        previous = credentials.provider_headers(
            old, ctx.format, self.provider_keys.get(old.name), ctx.headers
        )
        target = format_for(provider.format)
        credentials.apply(
            ctx,
            provider,
            target,
            self.provider_keys.get(provider.name),
            (*previous, *credentials.credential_headers(ctx.format)),
        )
        ctx.translator = self.translators[ctx.format.name, provider.name]
        ctx.provider = provider
        ctx.clear_route_cache = True


def _not_found(name: str) -> Refusal:
    return Refusal(
        404,
        f"The model '{shown(name)}' does not exist or you do not have access to it.",
        "model_not_found",
        kind="model_not_found",
        param="model",
    )


def build(config: Config, shared: Any, environ: Mapping[str, str]) -> ModelStage | None:
    """A stage when any model policy is configured (aliases, catalog, defaults or an
    allow-list on a route, a consumer or a JWT claim)."""
    jwt = config.auth.jwt
    wanted = (
        config.models.aliases
        or config.models.catalog
        or config.models.default
        or any(r.models is not None or r.default_model for r in config.routes)
        or any(c.models is not None for c in config.consumers.values())
        or (jwt is not None and jwt.models_claim)
    )
    if not wanted:
        return None
    return ModelStage(config, credentials.provider_keys(config, environ))
