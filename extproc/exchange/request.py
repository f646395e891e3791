"""The request phases: which route and API a request is for, what the stages say about
it, and what goes upstream (headers, path, body). Then the flow for the rest of the
exchange: inspected, or the pass-through null object."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from extproc import envoy_wire as wire
from extproc.config import Config, RouteConfig
from extproc.envoy_wire import BodyMode, Request, Response
from extproc.errors import shown
from extproc.exchange import offpath, translated
from extproc.exchange import response as response_phase
from extproc.headerlimits import header_problem
from extproc.headers import INTERNAL_HEADER_PREFIX
from extproc.logcontext import MAX_ID, set_exchange, trace_id_of
from extproc.paths import METHOD_OVERRIDE_HEADERS, PathRefused, canonical, looks_like_api, matches
from extproc.policy import Refusal, RequestContext
from extproc.policy.credentials import finalize, strip_query_credentials
from extproc.providers import RequestError, detect_format, format_for

if TYPE_CHECKING:
    from extproc.exchange.core import Exchange


class PassThrough:
    """The null object: not an API we inspect (or no route at all). The bodies were
    skipped by the headers answer; whatever still comes is let through untouched."""

    metered = False

    async def request_body(self, ex: Exchange, body: bytes, now: float) -> Response:
        return wire.continue_request_body()

    def response_headers(self, ex: Exchange, headers: dict[str, str], now: float) -> Response:
        assert ex.ctx is not None
        return wire.continue_response_headers(ex.ctx.response_headers, body=BodyMode.SKIP)


class Inspected:
    """A model API (chat, messages...): the body is parsed, the answer decoded."""

    metered = True

    async def request_body(self, ex: Exchange, body: bytes, now: float) -> Response:
        return await request_body(ex, body)

    def response_headers(self, ex: Exchange, headers: dict[str, str], now: float) -> Response:
        return response_phase.inspect_response(ex, headers, now)


PASS_THROUGH = PassThrough()
INSPECTED = Inspected()


def request_headers(ex: Exchange, request: Request) -> Response:
    """Route, path and method checks, the header stages; choose the flow."""
    entries = wire.header_entries(request)
    headers = dict(entries)
    ex.request_id = headers.get("x-request-id", "")[:MAX_ID]
    if not trace_id_of(ex.traceparent):  # no span of Envoy's: the client's own, if any
        ex.traceparent = headers.get("traceparent", "")
    ex.trace_id = trace_id_of(ex.traceparent)
    set_exchange(ex.request_id, ex.trace_id)  # every log line of this stream names them
    problem = header_problem(entries)
    if problem is not None:  # before any route or stage: nothing else reads them
        return ex.refuse(
            Refusal(431, problem, "request_header_fields_too_large", kind="bad_request")
        )
    path = headers.get(":path", "")
    config = ex.policy.config
    name = wire.route_name(request)
    route = (config.route(name) if name else None) or _route_by_prefix(config, path)
    if route is None:
        if any(name.startswith(INTERNAL_HEADER_PREFIX) for name in headers):
            # Envoy chose the route on a client's copies of the sidecar's headers (a
            # translated provider's route takes any path), and no route of the policy
            # is there to strip them: the provider would get it unchecked.
            return ex.refuse(
                Refusal(
                    404,
                    f"Unknown endpoint: '{shown(path.partition('?')[0])}'.",
                    "unknown_url",
                    kind="invalid_path",
                )
            )
        return wire.continue_request_headers(None, skip_bodies=True)
    ex.route_name = route.name
    provider = config.providers[route.provider]
    sent_path, path = path, strip_query_credentials(path)
    upstream_path = path
    if route.rewrite is not None:
        upstream_path = route.rewrite + path[len(route.prefix) :]
    try:
        upstream_path = canonical(upstream_path)
    except PathRefused as exc:
        return ex.refuse(Refusal(400, str(exc), "invalid_path", kind="invalid_path"))
    detected = detect_format(provider.format, upstream_path)
    if detected is None and looks_like_api(upstream_path):
        return ex.refuse(_ambiguous_path())
    fmt = detected or format_for(provider.format)
    method = headers.get(":method", "")
    ctx = ex.ctx = RequestContext(
        route=route,
        provider=provider,
        format=fmt,
        method=method,
        path=path,
        upstream_path=upstream_path,
        headers=headers,
        client_address=wire.client_address(request, headers),
    )
    if path != sent_path:  # a key in the query: never upstream, never in a log
        ctx.upstream_headers[":path"] = headers[":path"] = path
    inspect = detected is not None
    try:
        if any(name in headers for name in METHOD_OVERRIDE_HEADERS):
            raise Refusal(
                400,
                "Method override headers are not accepted; send the method itself.",
                "invalid_request",
                kind="invalid_path",
            )
        for stage in ex.policy.stages:
            stage.on_request_headers(ctx)
        _check_served(route, inspect, method, upstream_path)
        if inspect and "content-encoding" in headers:
            _check_identity_body(entries)
        if inspect and wire.end_of_stream(request):  # no body: Envoy sends no body message
            raise Refusal.of(
                RequestError("The request body is empty; expected a JSON object.", "missing_body")
            )
    except Refusal as refusal:
        return ex.refuse(refusal)
    if inspect:
        ex.flow = INSPECTED
        # Compressed answers would blind the inspection; ask for identity.
        ctx.upstream_headers["accept-encoding"] = "identity"
    return wire.continue_request_headers(
        ctx.upstream_headers,
        ctx.remove_headers,
        clear_route_cache=ctx.clear_route_cache,
        skip_bodies=not inspect,
    )


async def request_body(ex: Exchange, body: bytes) -> Response:
    """The whole JSON body: parse, run the stages, rewrite what goes upstream."""
    ctx = ex.ctx
    assert ctx is not None
    ctx.clear_route_cache = False
    ctx.upstream_headers.clear()
    ctx.remove_headers.clear()
    try:
        try:
            info = ctx.info = ctx.format.parse_request(body, ctx.upstream_path)
        except RequestError as exc:
            raise Refusal.of(exc) from None
        ex.model = info.model
        for stage in ex.policy.stages:
            await stage.on_request(ctx)
        if not info.model:  # neither the client nor a policy default named one
            raise Refusal.of(
                RequestError(
                    "You must provide a model parameter.", "missing_required_parameter", "model"
                )
            )
    except Refusal as refusal:
        return ex.refuse(refusal)
    ex.model = info.model  # a stage may have resolved an alias
    if ctx.translator is not None:
        return translated.request(ex, ctx, info)
    new_body = None
    if info.stream and ex.policy.config.streaming.ensure_usage:
        new_body = ctx.format.ensure_usage(info)
        ex.hide_usage = new_body is not None
    if new_body is None and ctx.body_dirty:
        new_body = orjson.dumps(info.body)
    if new_body is not None:
        ctx.upstream_headers["content-length"] = str(len(new_body))
    try:  # last: signs the final path and body (every rewrite comes before)
        finalize(ex.policy.cloud, ctx, body if new_body is None else new_body)
    except Refusal as refusal:
        return ex.refuse(refusal)
    # After the signing: Envoy removes this header before the request goes upstream.
    offpath.claim(ex, ctx.upstream_headers)
    response = wire.replace_request_body(
        new_body, ctx.upstream_headers, ctx.remove_headers, clear_route_cache=ctx.clear_route_cache
    )
    metadata = ex.reported = {"route": ex.route_name, "model": ex.model, **ex.identity()}
    return wire.with_metadata(response, metadata)


def _ambiguous_path() -> Refusal:
    return Refusal(
        400,
        "The request path differs from a model API path only in letter case; "
        "send it as the API documents it.",
        "invalid_path",
        kind="invalid_path",
    )


def _check_served(route: RouteConfig, api: bool, method: str, path: str) -> None:
    """Refuse what the policy would not see: a model API reached by another method
    (a lax provider may read a GET body), or a path the route does not list as
    `passthrough_paths` (it would reach the provider with the gateway's key, unmetered)."""
    if api:
        if method != "POST":
            raise Refusal(
                405,
                f"This endpoint accepts POST only, not '{shown(method, 16)}'.",
                "method_not_allowed",
                kind="invalid_path",
                headers={"allow": "POST"},
            )
        return
    if not matches(path, route.passthrough_paths):
        raise Refusal(
            404,
            f"Unknown endpoint on route '{route.name}': '{shown(path.partition('?')[0])}'.",
            "unknown_url",
            kind="invalid_path",
        )


def _check_identity_body(entries: list[tuple[str, str]]) -> None:
    """Refuse a compressed request body: the stages read the bytes as JSON, so a body
    the provider would decompress first is one the policy never read. Every copy of
    `content-encoding` counts (Envoy joins them with commas; another proxy may not)."""
    for name, value in entries:
        if name != "content-encoding":
            continue
        coding = value.strip().lower()
        if not coding or coding == "identity":
            continue
        raise Refusal(
            415,
            f"Compressed request bodies are not accepted (content-encoding "
            f"'{shown(coding, 32)}'); send the JSON body uncompressed.",
            "unsupported_content_encoding",
            kind="bad_request",
        )


def _route_by_prefix(config: Config, path: str) -> RouteConfig | None:
    """Fallback when Envoy did not send the route name: first matching prefix, as Envoy."""
    for route in config.routes:
        if path.startswith(route.prefix):
            return route
    return None
