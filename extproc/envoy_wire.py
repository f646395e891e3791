"""Envoy's ext_proc vocabulary: the only module that reads and builds Envoy protobufs
(besides the servicer stubs in `server.py`).

The exchange speaks in decisions (continue, replace or clear a body, refuse, set or
remove headers, attach metadata, reset); this module turns each into the
`ProcessingResponse` Envoy expects and reads what the exchange needs out of a
`ProcessingRequest`. Everything here is a plain function over plain Python values, so
the exchange never touches a message class.

The per-chunk answers that carry nothing (`CONTINUE_BODY`, `CLEAR_BODY`) are built once
and shared: the hot path allocates nothing for an untouched chunk. Never mutate them;
`finished` copies before it attaches the final metadata.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption, Metadata
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    ImmediateResponse,
    ProcessingRequest,
    ProcessingResponse,
    TrailersResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf import text_format
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct

from extproc.headers import METADATA_NAMESPACE

__all__ = [
    "CLEAR_BODY",
    "CONTINUE_BODY",
    "METADATA_NAMESPACE",
    "BodyMode",
    "Request",
    "Response",
    "client_address",
    "continue_request_body",
    "continue_request_headers",
    "continue_response_headers",
    "continue_trailers",
    "fill_struct",
    "finished",
    "header_entries",
    "header_map",
    "refuse",
    "replace_body",
    "replace_request_body",
    "reset",
    "route_name",
    "with_metadata",
]

Request = ProcessingRequest
parse_request = ProcessingRequest.FromString  # the gRPC server's parser of each message
Response = ProcessingResponse

_EXT_PROC_ATTRS = "envoy.filters.http.ext_proc"

CONTINUE_BODY = ProcessingResponse(response_body=BodyResponse())
CLEAR_BODY = ProcessingResponse(
    response_body=BodyResponse(response=CommonResponse(body_mutation=BodyMutation(clear_body=True)))
)


class BodyMode(enum.Enum):
    """What Envoy should do with the bodies after a headers answer."""

    AS_CONFIGURED = 0  # no mode override: the filter's processing mode stands
    SKIP = 1  # send no body messages (saves a message per chunk)
    BUFFERED = 2  # send the whole body in one message


# -- reading a request ------------------------------------------------------------------


def header_entries(request: ProcessingRequest) -> list[tuple[str, str]]:
    """The headers of a request- or response-headers message, each entry as sent (a name
    repeated is several entries: limits must count them all)."""
    kind = request.WhichOneof("request")
    headers = getattr(request, kind).headers.headers
    return [
        (h.key, h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value) for h in headers
    ]


def header_map(request: ProcessingRequest) -> dict[str, str]:
    """The headers of a request- or response-headers message, by name (the last entry of
    a repeated name)."""
    return dict(header_entries(request))


def end_of_stream(request: ProcessingRequest) -> bool:
    """Request headers with `end_of_stream`: no body message will follow."""
    return request.request_headers.end_of_stream


def _attribute(request: ProcessingRequest, name: str) -> str:
    attrs = request.attributes.get(_EXT_PROC_ATTRS)
    if attrs is None:
        attrs = request.request_headers.attributes.get(_EXT_PROC_ATTRS)
    if attrs is None:
        return ""
    value = attrs.fields.get(name)
    return value.string_value if value is not None else ""


def route_name(request: ProcessingRequest) -> str:
    """The name of the route Envoy matched (`xds.route_name`), "" when not sent."""
    return _attribute(request, "xds.route_name")


def upstream_host_fields(request: ProcessingRequest, namespace: str) -> dict[str, object]:
    """An upstream filter's chosen endpoint: its `filter_metadata[namespace]` (Envoy
    sends the attribute `xds.upstream_host_metadata` as a Metadata in text format)."""
    text = _attribute(request, "xds.upstream_host_metadata")
    if not text:
        return {}
    metadata = Metadata()
    try:
        text_format.Parse(text, metadata)
    except text_format.ParseError:
        return {}
    if namespace not in metadata.filter_metadata:
        return {}
    return MessageToDict(metadata.filter_metadata[namespace])


def client_address(request: ProcessingRequest, headers: Mapping[str, str]) -> str:
    """Envoy's view of the peer (`source.address`), else the last X-Forwarded-For hop:
    the one the proxy in front of us appended. The first is whatever the client wrote
    (a client-IP rate limit keyed on it is evaded by changing it each request)."""
    address = _attribute(request, "source.address")
    if address:
        host, sep, port = address.rpartition(":")
        return host.strip("[]") if sep and port.isdigit() else address
    return headers.get("x-forwarded-for", "").rpartition(",")[2].strip()


# -- decisions --------------------------------------------------------------------------


def _header(key: str, value: str) -> HeaderValueOption:
    # Envoy reads only raw_value in mutations.
    return HeaderValueOption(header=HeaderValue(key=key, raw_value=value.encode()))


def _fill_mutation(
    mutation: HeaderMutation, set_headers: Mapping[str, str], remove: Iterable[str]
) -> None:
    """`mutation` (present, maybe empty) given the headers to set and remove, written
    by attribute paths: about a quarter of the cost of nested constructors and copies
    (the headers answers of every exchange)."""
    mutation.SetInParent()
    if remove:
        mutation.remove_headers.extend(remove)
    add = mutation.set_headers.add
    for name, value in set_headers.items():
        header = add().header  # Envoy reads only raw_value in mutations
        header.key = name
        header.raw_value = value.encode()


def continue_request_headers(
    set_headers: Mapping[str, str] | None,
    remove: Iterable[str] = (),
    *,
    clear_route_cache: bool = False,
    skip_bodies: bool,
) -> ProcessingResponse:
    """Let the request headers go on, changed as given (`None`: no mutation at all);
    `skip_bodies` when nothing will be inspected (neither body is sent to us)."""
    response = ProcessingResponse()
    common = response.request_headers.response
    common.SetInParent()
    if set_headers is not None:
        _fill_mutation(common.header_mutation, set_headers, remove)
    common.clear_route_cache = clear_route_cache
    if skip_bodies:
        response.mode_override.request_body_mode = ProcessingMode.NONE
        response.mode_override.response_body_mode = ProcessingMode.NONE
    return response


def continue_request_body() -> ProcessingResponse:
    """The request body goes on untouched."""
    return ProcessingResponse(request_body=BodyResponse())


def replace_request_body(
    body: bytes | None,
    set_headers: Mapping[str, str],
    remove: Iterable[str],
    *,
    clear_route_cache: bool,
) -> ProcessingResponse:
    """The buffered request body goes on, replaced when `body` is given; the request
    headers may still change here (the model in the body may pick route and path)."""
    response = ProcessingResponse()
    common = response.request_body.response
    common.SetInParent()
    common.clear_route_cache = clear_route_cache
    if body is not None:
        common.body_mutation.body = body
    if set_headers or remove:
        _fill_mutation(common.header_mutation, set_headers, remove)
    return response


def continue_response_headers(
    set_headers: Mapping[str, str] | None,
    remove: Iterable[str] = (),
    *,
    body: BodyMode = BodyMode.AS_CONFIGURED,
) -> ProcessingResponse:
    """Let the response headers go on to the client, changed as given."""
    response = ProcessingResponse()
    common = response.response_headers.response
    common.SetInParent()
    if set_headers is not None:
        _fill_mutation(common.header_mutation, set_headers, remove)
    if body is BodyMode.SKIP:
        response.mode_override.response_body_mode = ProcessingMode.NONE
    elif body is BodyMode.BUFFERED:
        response.mode_override.response_body_mode = ProcessingMode.BUFFERED
    return response


def skip_response_body(response: ProcessingResponse) -> ProcessingResponse:
    """A response-headers answer that also turns this filter's body mode off (the body
    is read by the observing filter: `exchange.offpath`)."""
    response.mode_override.response_body_mode = ProcessingMode.NONE
    return response


def continue_trailers(*, request: bool) -> ProcessingResponse:
    """Trailers are not requested in our processing mode; answered anyway."""
    if request:
        return ProcessingResponse(request_trailers=TrailersResponse())
    return ProcessingResponse(response_trailers=TrailersResponse())


def replace_body(body: bytes) -> ProcessingResponse:
    """This response chunk becomes `body` (empty: cleared)."""
    if not body:
        return CLEAR_BODY
    response = ProcessingResponse()  # attribute paths: a quarter of nested constructors
    response.response_body.response.body_mutation.body = body
    return response


def body_with_headers(body: bytes | None, headers: Mapping[str, str]) -> ProcessingResponse:
    """A buffered answer's one chunk (`body` None: as it came) plus response headers:
    Envoy holds the headers of a BUFFERED body until this answer, so they still apply."""
    response = ProcessingResponse()
    common = response.response_body.response
    common.SetInParent()
    if body is not None:
        common.body_mutation.body = body
    for name, value in headers.items():
        common.header_mutation.set_headers.append(_header(name, value))
    return response


def refuse(
    status: int, headers: Mapping[str, str], body: bytes, details: str
) -> ProcessingResponse:
    """Answer the client now with `status` and a JSON `body`; `details` is Envoy's
    response-code details (access logs, local-reply matching)."""
    mutation = HeaderMutation(set_headers=[_header("content-type", "application/json")])
    for name, value in headers.items():
        mutation.set_headers.append(_header(name, value))
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=status), headers=mutation, body=body, details=details
        )
    )


def reset(status: int, details: str) -> ProcessingResponse:
    """An immediate response after the response started: Envoy resets the stream (and
    closes the provider's connection)."""
    return ProcessingResponse(
        immediate_response=ImmediateResponse(status=HttpStatus(code=status), details=details)
    )


def with_metadata(response: ProcessingResponse, values: dict[str, object]) -> ProcessingResponse:
    """Attach `values` as dynamic metadata (namespace `ai_gateway`) to a fresh response."""
    fill_struct(response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value, values)
    return response


def fill_struct(struct: Struct, values: Mapping[str, object]) -> None:
    """`struct.update(values)`, written in place: the strings, numbers and booleans of
    the metadata set their `Value` field directly (protobuf's `update` is Python that
    tests each value's type in turn, then copies: about 3x the cost); anything else
    goes through `update` as before."""
    fields = struct.fields
    for key, value in values.items():
        kind = type(value)
        if kind is str:
            fields[key].string_value = value
        elif kind is bool:
            fields[key].bool_value = value
        elif kind is int or kind is float:
            fields[key].number_value = value
        else:  # None, lists, mappings, subclasses
            struct.update({key: value})


def finished(response: ProcessingResponse, values: dict[str, object]) -> ProcessingResponse:
    """A copy of `response` (maybe a shared constant) carrying the final metadata."""
    final = ProcessingResponse()
    final.CopyFrom(response)
    return with_metadata(final, values)
