"""One HTTP exchange as Envoy reports it: ProcessingRequest in, ProcessingResponse out.

Sans-I/O: no gRPC, sockets or clocks in here (the server passes `now`), so every hard
case is a plain unit test. The phases arrive in order: request headers, request body
(BUFFERED, whole JSON), response headers, response body (STREAMED, one message per
chunk, exactly one answer each). Decisions belong to the policy stages (auth, models,
guards, limits); this module applies them to the protocol.

The response body rule: a chunk whose bytes are all complete, untouched frames is
answered with no mutation (the cheap, byte-exact default); otherwise the chunk is
replaced by exactly the bytes the client should get now, and an unfinished frame waits
for its end. Once the response has started, a problem can no longer change the status:
the stream is ended with the format's error event and later chunks are cleared
(`streaming.on_block: drain`), or the next chunk is answered with an ImmediateResponse,
which makes Envoy close the provider's stream and reset the client's (`close`).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable

import orjson
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingRequest,
    ProcessingResponse,
    TrailersResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct

from extproc.config import Config, RouteConfig
from extproc.errors import SIDECAR_DETAILS_PREFIX, bounded, error_body, shown
from extproc.headerlimits import header_problem
from extproc.metrics import Metrics
from extproc.paths import METHOD_OVERRIDE_HEADERS, PathRefused, canonical, looks_like_api, matches
from extproc.policy import Policy, Refusal, RequestContext, StreamBlocked, StreamFilter
from extproc.policy.credentials import strip_query_credentials
from extproc.providers import (
    RequestError,
    StreamError,
    decoder_label,
    detect_format,
    format_for,
    response_decoder,
)
from extproc.providers.base import ResponseDecoder, StreamEvent
from extproc.sse import FrameTooLarge
from extproc.usage import Usage, estimate_prompt_tokens

log = logging.getLogger("extproc.exchange")

METADATA_NAMESPACE = "ai_gateway"
_EXT_PROC_ATTRS = "envoy.filters.http.ext_proc"

_CONTINUE_BODY = ProcessingResponse(response_body=BodyResponse())
_CLEAR_BODY = ProcessingResponse(
    response_body=BodyResponse(response=CommonResponse(body_mutation=BodyMutation(clear_body=True)))
)


class Mode:
    PASS = 0  # not an API we inspect: answer every phase with "continue"
    STREAM = 1  # SSE (or other event stream) response: frame, meter, maybe rewrite
    JSON = 2  # whole JSON response: keep (bounded) and meter at the end
    DONE = 3  # stream ended by the gateway: clear whatever still comes


class Exchange:
    """State for one request/response pair, fed by one ext_proc `Process` stream."""

    def __init__(self, policy: Policy, metrics: Metrics, now: float) -> None:
        self.policy = policy
        self.metrics = metrics
        self.started = now
        self.ctx: RequestContext | None = None
        self.route_name = "unknown"
        self.model = ""
        self.status = 0
        self.mode = Mode.PASS
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.error_kind = ""
        self.after: list[Awaitable[None]] = []  # I/O the server runs after answering
        self._inspect = False  # an API we parse (chat, messages...), not a pass-through
        self._hide_usage = False
        self._decoder: ResponseDecoder | None = None
        self._filters: list[StreamFilter] = []
        self._inflate: zlib._Decompress | None = None
        self._json: bytearray | None = None
        self._first_frame_at = 0.0
        self._held = False
        self._closed = False
        self._upstream_closed = False
        self._answered = False  # response headers came (the provider's, or Envoy's)
        metrics.active.inc()

    @property
    def consumer(self) -> str:
        return self.ctx.consumer if self.ctx else ""

    # -- dispatch -------------------------------------------------------------------

    def handle(self, request: ProcessingRequest, now: float) -> ProcessingResponse:
        """Every phase but the request body, which may wait on I/O (`on_request_body`)."""
        kind = request.WhichOneof("request")
        if kind == "response_body":
            body = request.response_body
            return self.on_response_body(body.body, body.end_of_stream, now)
        if kind == "request_headers":
            return self._on_request_headers(request)
        if kind == "response_headers":
            return self._on_response_headers(request)
        # Trailers are not requested in our processing mode; answer anyway.
        if kind == "request_trailers":
            return ProcessingResponse(request_trailers=TrailersResponse())
        return ProcessingResponse(response_trailers=TrailersResponse())

    # -- request ----------------------------------------------------------------------

    def _on_request_headers(self, request: ProcessingRequest) -> ProcessingResponse:
        msg = request.request_headers
        headers = _header_map(msg.headers.headers)
        problem = header_problem(headers)
        if problem is not None:  # before any route or stage: nothing else reads them
            return self._refuse(
                Refusal(431, problem, "request_header_fields_too_large", kind="bad_request")
            )
        path = headers.get(":path", "")
        config = self.policy.config
        name = _route_name(request)
        route = (config.route(name) if name else None) or _route_by_prefix(config, path)
        if route is None:
            return _continue_headers(None, pass_through=True)
        self.route_name = route.name
        provider = config.providers[route.provider]
        sent_path, path = path, strip_query_credentials(path)
        upstream_path = path
        if route.rewrite is not None:
            upstream_path = route.rewrite + path[len(route.prefix) :]
        try:
            upstream_path = canonical(upstream_path)
        except PathRefused as exc:
            return self._refuse(Refusal(400, str(exc), "invalid_path", kind="invalid_path"))
        detected = detect_format(provider.format, upstream_path)
        if detected is None and looks_like_api(upstream_path):
            return self._refuse(_ambiguous_path())
        fmt = detected or format_for(provider.format)
        method = headers.get(":method", "")
        ctx = self.ctx = RequestContext(
            route=route,
            provider=provider,
            format=fmt,
            method=method,
            path=path,
            upstream_path=upstream_path,
            headers=headers,
            client_address=_client_address(request, headers),
        )
        if path != sent_path:  # a key in the query: never upstream, never in a log
            ctx.upstream_headers[":path"] = headers[":path"] = path
        try:
            if any(name in headers for name in METHOD_OVERRIDE_HEADERS):
                raise Refusal(
                    400,
                    "Method override headers are not accepted; send the method itself.",
                    "invalid_request",
                    kind="invalid_path",
                )
            for stage in self.policy.stages:
                stage.on_request_headers(ctx)
            _check_served(route, detected is not None, method, upstream_path)
            self._inspect = detected is not None
            if self._inspect and msg.end_of_stream:  # no body: Envoy sends no body message
                raise _bad_request(
                    RequestError(
                        "The request body is empty; expected a JSON object.", "missing_body"
                    )
                )
        except Refusal as refusal:
            return self._refuse(refusal)
        if self._inspect:
            # Compressed answers would blind the inspection; ask for identity.
            ctx.upstream_headers["accept-encoding"] = "identity"
        response = _continue_headers(_request_mutation(ctx), pass_through=not self._inspect)
        response.request_headers.response.clear_route_cache = ctx.clear_route_cache
        return response

    async def on_request_body(self, body: bytes, now: float) -> ProcessingResponse:
        ctx = self.ctx
        if ctx is None or not self._inspect:
            return ProcessingResponse(request_body=BodyResponse())
        ctx.clear_route_cache = False
        ctx.upstream_headers.clear()
        ctx.remove_headers.clear()
        try:
            try:
                info = ctx.info = ctx.format.parse_request(body, ctx.upstream_path)
            except RequestError as exc:
                raise _bad_request(exc) from None
            self.model = info.model
            for stage in self.policy.stages:
                await stage.on_request(ctx)
            if not info.model:  # neither the client nor a policy default named one
                raise _bad_request(
                    RequestError(
                        "You must provide a model parameter.", "missing_required_parameter", "model"
                    )
                )
        except Refusal as refusal:
            return self._refuse(refusal)
        self.model = info.model  # a stage may have resolved an alias
        new_body = None
        if info.stream and self.policy.config.streaming.ensure_usage:
            new_body = ctx.format.ensure_usage(info)
            self._hide_usage = new_body is not None
        if new_body is None and ctx.body_dirty:
            new_body = orjson.dumps(info.body)
        common = CommonResponse(clear_route_cache=ctx.clear_route_cache)
        if new_body is not None:
            common.body_mutation.body = new_body
            ctx.upstream_headers["content-length"] = str(len(new_body))
        if ctx.upstream_headers or ctx.remove_headers:
            common.header_mutation.CopyFrom(_request_mutation(ctx))
        response = ProcessingResponse(request_body=BodyResponse(response=common))
        _set_metadata(response, {"route": self.route_name, "model": self.model, **self._identity()})
        return response

    def _identity(self) -> dict[str, object]:
        ctx = self.ctx
        if ctx is None:
            return {}
        return {"consumer": ctx.consumer, **ctx.metadata}

    def _refuse(self, refusal: Refusal) -> ProcessingResponse:
        self.status = refusal.status
        if refusal.status >= 400:
            self.error_kind = refusal.kind
            self.metrics.errors.labels(refusal.kind).inc()
            log.warning(
                "refused route=%s path=%s consumer=%s status=%d code=%s: %s",
                self.route_name,
                shown(self.ctx.path, 256) if self.ctx else "",  # query credentials stripped
                shown(self.consumer or "-"),
                refusal.status,
                refusal.code,
                bounded(refusal.message),
            )
        headers = HeaderMutation(set_headers=[_header("content-type", "application/json")])
        extra = dict(refusal.headers)
        if self.ctx is not None:
            extra = {**self.ctx.response_headers, **extra}
        for name, value in extra.items():
            headers.set_headers.append(_header(name, value))
        body = refusal.body
        if body is None:  # in the caller's own API shape, so its SDK raises its usual error
            render = self.ctx.format.error_body if self.ctx is not None else error_body
            body = render(refusal.status, bounded(refusal.message), refusal.code, refusal.param)
        response = ProcessingResponse(
            immediate_response=ImmediateResponse(
                status=HttpStatus(code=refusal.status),
                headers=headers,
                body=body,
                details=f"{SIDECAR_DETAILS_PREFIX}{refusal.code or refusal.status}",
            )
        )
        # The access log names who was refused and why.
        _set_metadata(
            response,
            {
                "route": self.route_name,
                "model": shown(self.model),
                "refused": refusal.code or refusal.kind,
                **self._identity(),
            },
        )
        return response

    # -- response ---------------------------------------------------------------------

    def _on_response_headers(self, request: ProcessingRequest) -> ProcessingResponse:
        headers = _header_map(request.response_headers.headers.headers)
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 0
        ctx = self.ctx
        if ctx is None:  # e.g. Envoy's own 413 before any request phase reached us
            return _continue_response_headers(None, skip_body=True)
        ctx.status = self.status
        self._answered = True
        for stage in self.policy.stages:
            stage.on_response_headers(ctx)
        mutation = HeaderMutation()
        for name, value in ctx.response_headers.items():
            mutation.set_headers.append(_header(name, value))
        if not self._inspect or self.status == 0:
            return _continue_response_headers(mutation, skip_body=True)
        if self.status >= 400:
            self.error_kind = "upstream_error"
            self.metrics.errors.labels("upstream_error").inc()
            log.warning(
                "provider answered %d route=%s model=%s",
                self.status,
                self.route_name,
                shown(self.model),
            )
            return _continue_response_headers(mutation, skip_body=True)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            # The provider ignored accept-encoding: decode incrementally (linear) and
            # send identity on, so the client and our inspection see the same bytes.
            self._inflate = zlib.decompressobj(47)  # 32 + 15: gzip or zlib header
            mutation.remove_headers.extend(("content-encoding", "content-length"))
        elif encoding != "identity":
            log.warning("cannot inspect content-encoding %r; passing through", shown(encoding))
            self.error_kind = "decode_error"
            self.metrics.errors.labels("decode_error").inc()
            return _continue_response_headers(mutation, skip_body=True)
        content_type = headers.get("content-type", "")
        self._decoder = response_decoder(
            ctx.format,
            content_type,
            stream=ctx.info.stream if ctx.info else False,
            hide_usage=self._hide_usage,
            max_frame_bytes=self.policy.config.streaming.max_frame_bytes,
        )
        if self._decoder is not None or "json" in content_type:
            self.metrics.decoders.labels(decoder_label(ctx.format, self._decoder)).inc()
        if self._decoder is not None:
            self.mode = Mode.STREAM
            ctx.decoder = self._decoder  # filters read and rewrite its events
            self._filters = [
                f for stage in self.policy.stages if (f := stage.stream_filter(ctx)) is not None
            ]
            if "content-length" in headers and (self._hide_usage or self._filters):
                mutation.remove_headers.append("content-length")
        elif "json" in content_type:
            self.mode = Mode.JSON
            self._json = bytearray()
            if ctx.buffer_response:
                # A stage must see the whole answer before the client gets any of it.
                response = _continue_response_headers(mutation, skip_body=False)
                response.mode_override.response_body_mode = ProcessingMode.BUFFERED
                return response
        return _continue_response_headers(mutation, skip_body=False)

    def on_response_body(self, chunk: bytes, end: bool, now: float) -> ProcessingResponse:
        """One streamed chunk (the hot path: the server calls it directly)."""
        if self.mode == Mode.DONE:
            if end:
                return self._finish(_CLEAR_BODY, now)
            if self.policy.config.streaming.on_block == "close":
                return self._close_upstream(now)
            return _CLEAR_BODY
        inflated = self._inflate is not None
        if inflated:
            try:
                chunk = self._inflate.decompress(chunk) + (self._inflate.flush() if end else b"")
            except zlib.error as exc:
                return self._end_stream(
                    f"could not decode the provider's gzip stream: {exc}", "decode_error", now, end
                )
        if self.mode == Mode.STREAM:
            return self._stream_chunk(chunk, end, inflated, now)
        if self.mode == Mode.JSON:
            return self._json_chunk(chunk, end, inflated, now)
        response = _replace_body(chunk) if inflated else _CONTINUE_BODY
        return self._finish(response, now) if end else response

    def _json_chunk(
        self, chunk: bytes, end: bool, inflated: bool, now: float
    ) -> ProcessingResponse:
        limit = self.policy.config.streaming.max_json_response_bytes
        if self._json is not None:
            if len(self._json) + len(chunk) <= limit:
                self._json += chunk
            else:
                self._json = None  # too big to keep; usage will be estimated
        if not self._first_frame_at and chunk:
            self._first_frame_at = now
        if end and self.ctx is not None and self.ctx.buffer_response and self._json is not None:
            body = bytes(self._json)
            try:
                for stage in self.policy.stages:
                    body = stage.on_completion(self.ctx, body) or body
            except Refusal as refusal:
                self._settle(now, complete=True)
                return self._refuse(refusal)
            if body != self._json:
                self._json = bytearray(body)
                return self._finish(_replace_body(body), now)
        response = _replace_body(chunk) if inflated else _CONTINUE_BODY
        return self._finish(response, now) if end else response

    def _stream_chunk(
        self, chunk: bytes, end: bool, inflated: bool, now: float
    ) -> ProcessingResponse:
        decoder = self._decoder
        assert decoder is not None
        if not self._filters and not inflated:
            whole = decoder.feed_whole(chunk)
            if whole is not None:  # whole frames, nothing to read: no events needed
                if not self._first_frame_at:
                    self._first_frame_at = now
                response = _CONTINUE_BODY if whole is chunk else _replace_body(whole)
                return self._finish(response, now) if end else response
        try:
            events = decoder.feed(chunk)
            if end:
                events += decoder.finish()
        except (FrameTooLarge, StreamError) as exc:
            kind = getattr(exc, "kind", "frame_too_large")
            return self._end_stream(str(exc), kind, now, end)
        if events and not self._first_frame_at:
            self._first_frame_at = now
        held = decoder.buffered > 0
        changed = inflated or held or self._held
        self._held = held
        if self._filters:
            passed = events
            try:
                for stream_filter in self._filters:
                    passed = stream_filter.process(passed, end)
            except StreamBlocked as blocked:
                first = events[0] if events else None
                return self._end_stream(
                    blocked.message, blocked.code, now, end, blocked.kind, before=first
                )
            if passed is not events:
                changed = True
                events = passed
        out = []
        for event in events:
            if event.out is not event.raw:
                changed = True
            out.append(event.out)
        response = _replace_body(b"".join(out)) if changed else _CONTINUE_BODY
        return self._finish(response, now) if end else response

    def _end_stream(
        self,
        message: str,
        code: str,
        now: float,
        end: bool,
        kind: str | None = None,
        before: StreamEvent | None = None,
    ) -> ProcessingResponse:
        """Too late for a status: end the stream with the format's error event
        (`before`: the first event it replaces, which some framings need to know)."""
        kind = kind or code
        log.warning(
            "ending stream route=%s model=%s: %s", self.route_name, shown(self.model), message
        )
        self.error_kind = kind
        self.metrics.errors.labels(kind).inc()
        self.mode = Mode.DONE
        # A JSON answer that already started can get nothing well-formed after it.
        tail = self._decoder.error_event(message, code, before=before) if self._decoder else b""
        response = _replace_body(tail)
        return self._finish(response, now) if end else response

    def _close_upstream(self, now: float) -> ProcessingResponse:
        """`streaming.on_block: close`: the error event went out with an earlier chunk,
        and this one shows the provider is still generating (and billing). Once the
        response has started, Envoy answers an ImmediateResponse by resetting the stream:
        the provider's connection is closed, and the client, which already has the whole
        error event (and `[DONE]`), sees its HTTP stream end without a clean end (HTTP/1:
        the connection closes before the last chunk; HTTP/2: RST_STREAM). Waiting for
        this chunk rather than sending it with the error event gives the error event a
        chunk's time to leave Envoy before the reset."""
        kind = self.error_kind or "stream_ended"
        self.metrics.upstream_closed.labels(kind).inc()
        log.info(
            "closing provider stream route=%s model=%s after %s (streaming.on_block: close)",
            self.route_name,
            shown(self.model or "unknown"),
            kind,
        )
        self._upstream_closed = True
        reset = ImmediateResponse(
            status=HttpStatus(code=self.status or 200), details="ai_gateway_upstream_closed"
        )
        return self._finish(ProcessingResponse(immediate_response=reset), now)

    # -- end of exchange --------------------------------------------------------------

    def _finish(self, response: ProcessingResponse, now: float) -> ProcessingResponse:
        """Last response chunk: settle usage and hand the figures to Envoy."""
        self._settle(now, complete=True)
        final = ProcessingResponse()
        final.CopyFrom(response)  # the shared no-op answers must stay untouched
        usage = self.usage
        _set_metadata(
            final,
            {
                "route": self.route_name,
                "model": self.model,
                **self._identity(),
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
                "cached_tokens": usage.cached_tokens,
                "reasoning_tokens": usage.reasoning_tokens,
                "usage_estimated": usage.estimated,
                "finish_reason": self.finish_reason or "",
                **({"upstream_closed": True} if self._upstream_closed else {}),
            },
        )
        return final

    def close(self, now: float) -> None:
        """The ext_proc stream is over (normally, or the client/provider went away)."""
        if not self._closed:
            self._settle(now, complete=False)

    def _settle(self, now: float, complete: bool) -> None:
        if self._closed:
            return
        self._closed = True
        m = self.metrics
        m.active.dec()
        named = self.model or "unknown"
        metered = self._inspect and self.model and 0 < self.status < 400
        labels = self.policy.labels
        # As a label: known to the policy, or a name that a provider without a catalog
        # took (it answered, and not "no such model": 400/404), learned up to a bound;
        # else "other".
        took = self._answered and self.status not in (400, 404) and self.ctx is not None
        model = labels.model(named, learn=took and self.ctx.provider.name in labels.open_providers)
        if metered:
            if not complete and not self.error_kind:
                self.error_kind = "stream_aborted"
                m.errors.labels("stream_aborted").inc()
                log.warning(
                    "stream ended early route=%s model=%s (client hung up or provider cut it)",
                    self.route_name,
                    shown(named),
                )
            self._meter(now, model)
        if self.ctx is not None:
            for stage in self.policy.stages:
                pending = stage.on_complete(self.ctx, self.usage, complete)
                if pending is not None:
                    self.after.append(pending)
        status = str(self.status) if self.status else "none"
        m.requests.labels(self.route_name, model, status).inc()
        log.info(
            "exchange route=%s consumer=%s model=%s status=%s prompt=%d completion=%d "
            "estimated=%s duration_ms=%.1f%s",
            self.route_name,
            shown(self.consumer or "-"),
            shown(named),
            status,
            self.usage.prompt_tokens,
            self.usage.completion_tokens,
            self.usage.estimated,
            (now - self.started) * 1000,
            f" error={self.error_kind}" if self.error_kind else "",
        )

    def _meter(self, now: float, model: str) -> None:
        m = self.metrics
        assert self.ctx is not None
        if self._decoder is not None:
            self.usage = self._decoder.usage
            self.finish_reason = self._decoder.finish_reason
            content_events = self._decoder.content_events
        else:
            content_events = 0
            if self._json:
                body = bytes(self._json)
                self.usage = self.ctx.format.completion_usage(body) or self.usage
                self.finish_reason = self.ctx.format.completion_finish_reason(body)
        usage = self.usage
        if not usage.reported:
            texts = self.ctx.info.prompt_texts if self.ctx.info else []
            usage.set_estimated(estimate_prompt_tokens(texts), content_events)
            m.usage_estimated.labels(model).inc()
        consumer = self.policy.labels.consumer(self.consumer or "anonymous")
        m.tokens.labels(model, consumer, "prompt").inc(usage.prompt_tokens)
        m.tokens.labels(model, consumer, "completion").inc(usage.completion_tokens)
        if usage.cached_tokens:
            m.tokens.labels(model, consumer, "cached").inc(usage.cached_tokens)
        if usage.reasoning_tokens:
            m.tokens.labels(model, consumer, "reasoning").inc(usage.reasoning_tokens)
        m.stream_duration.labels(self.route_name, model).observe(now - self.started)
        if self._first_frame_at:
            m.ttft.labels(self.route_name, model).observe(self._first_frame_at - self.started)
            if usage.completion_tokens > 1 and self.mode != Mode.JSON:
                m.tpot.labels(self.route_name, model).observe(
                    (now - self._first_frame_at) / (usage.completion_tokens - 1)
                )


# -- helpers ----------------------------------------------------------------------------


def _bad_request(exc: RequestError) -> Refusal:
    return Refusal(exc.status, exc.message, exc.code, kind="bad_request", param=exc.param)


def _header(key: str, value: str) -> HeaderValueOption:
    # Envoy reads only raw_value in mutations.
    return HeaderValueOption(header=HeaderValue(key=key, raw_value=value.encode()))


def _header_map(headers) -> dict[str, str]:
    return {
        h.key: h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value for h in headers
    }


def _request_mutation(ctx: RequestContext) -> HeaderMutation:
    mutation = HeaderMutation(remove_headers=ctx.remove_headers)
    for name, value in ctx.upstream_headers.items():
        mutation.set_headers.append(_header(name, value))
    return mutation


def _attribute(request: ProcessingRequest, name: str) -> str:
    attrs = request.attributes.get(_EXT_PROC_ATTRS)
    if attrs is None:
        attrs = request.request_headers.attributes.get(_EXT_PROC_ATTRS)
    if attrs is None:
        return ""
    value = attrs.fields.get(name)
    return value.string_value if value is not None else ""


def _route_name(request: ProcessingRequest) -> str:
    return _attribute(request, "xds.route_name")


def _client_address(request: ProcessingRequest, headers: dict[str, str]) -> str:
    """Envoy's view of the peer (`source.address`), else the first X-Forwarded-For hop."""
    address = _attribute(request, "source.address")
    if address:
        host, sep, port = address.rpartition(":")
        return host.strip("[]") if sep and port.isdigit() else address
    return headers.get("x-forwarded-for", "").split(",")[0].strip()


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


def _route_by_prefix(config: Config, path: str) -> RouteConfig | None:
    """Fallback when Envoy did not send the route name: first matching prefix, as Envoy."""
    for route in config.routes:
        if path.startswith(route.prefix):
            return route
    return None


def _continue_headers(mutation: HeaderMutation | None, *, pass_through: bool) -> ProcessingResponse:
    response = ProcessingResponse(
        request_headers=HeadersResponse(response=CommonResponse(header_mutation=mutation))
    )
    if pass_through:
        # Nothing to inspect: skip the bodies entirely (saves a message per chunk).
        response.mode_override.request_body_mode = ProcessingMode.NONE
        response.mode_override.response_body_mode = ProcessingMode.NONE
    return response


def _continue_response_headers(
    mutation: HeaderMutation | None, *, skip_body: bool
) -> ProcessingResponse:
    response = ProcessingResponse(
        response_headers=HeadersResponse(response=CommonResponse(header_mutation=mutation))
    )
    if skip_body:
        response.mode_override.response_body_mode = ProcessingMode.NONE
    return response


def _replace_body(body: bytes) -> ProcessingResponse:
    if not body:
        return _CLEAR_BODY
    response = ProcessingResponse()  # attribute paths: a quarter of nested constructors
    response.response_body.response.body_mutation.body = body
    return response


def _set_metadata(response: ProcessingResponse, values: dict[str, object]) -> None:
    fields = Struct()
    fields.update(values)
    response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.CopyFrom(fields)
