"""Dynamic metadata for fewer CPU: the Struct is written in place, exactly as protobuf's
`Struct.update` writes it, and the response headers of a stream carry no second copy
of what the request body's answer already handed Envoy (which merges the fields)."""

from __future__ import annotations

from google.protobuf.struct_pb2 import Struct
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import envoy_wire as wire
from tests.test_exchange import CHAT, Run, headers_msg, metadata


class _Text(str):
    """A str subclass: takes the general path."""


SCALARS = st.one_of(
    st.text(max_size=8),
    st.text(max_size=4).map(_Text),
    st.booleans(),
    st.integers(-(2**60), 2**60),
    st.floats(allow_nan=False),
    st.none(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), VALUES, max_size=12))
def test_fill_struct_writes_what_struct_update_writes(values: dict) -> None:
    reference = Struct()
    reference.update(values)
    filled = Struct()
    wire.fill_struct(filled, values)
    assert filled.SerializeToString(deterministic=True) == reference.SerializeToString(
        deterministic=True
    )


def test_with_metadata_sets_the_namespace_of_the_response() -> None:
    values = {"route": "r", "model": "m", "prompt_tokens": 12, "usage_estimated": False}
    answer = wire.with_metadata(wire.continue_request_body(), values)
    assert metadata(answer) == values


def test_a_stream_s_response_headers_send_metadata_only_when_it_changed() -> None:
    run = Run()
    _, body_answer = run.request({**CHAT, "stream": True})
    sent = metadata(body_answer)
    assert sent["model"] == CHAT["model"] and sent["route"]
    headers = headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True)
    answer = run.send(headers)
    assert answer.HasField("response_headers")
    assert not answer.HasField("dynamic_metadata")  # Envoy holds these fields already
    # A field that changed after the request body (failover: the target that answered)
    # goes with the response headers again.
    again = Run()
    again.request({**CHAT, "stream": True})
    assert again.ex.ctx is not None
    again.ex.ctx.metadata["target"] = "b"
    changed = again.send(headers)
    assert metadata(changed)["target"] == "b" and metadata(changed)["model"] == CHAT["model"]


# -- header mutations by attribute paths -------------------------------------------------

HEADERS = st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=4)
REMOVE = st.lists(st.text(max_size=12), max_size=3)


def _old_mutation(set_headers: dict, remove: list) -> object:
    """The nested-constructor form these answers had before (the reference)."""
    from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
    from envoy.service.ext_proc.v3.external_processor_pb2 import HeaderMutation

    mutation = HeaderMutation(remove_headers=remove)
    for name, value in set_headers.items():
        mutation.set_headers.append(
            HeaderValueOption(header=HeaderValue(key=name, raw_value=value.encode()))
        )
    return mutation


def _same(a: object, b: object) -> bool:
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), HEADERS), REMOVE, st.booleans(), st.booleans())
def test_headers_answers_are_the_messages_nested_constructors_built(
    set_headers: dict | None, remove: list, clear: bool, skip: bool
) -> None:
    from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
    from envoy.service.ext_proc.v3.external_processor_pb2 import (
        BodyResponse,
        CommonResponse,
        HeadersResponse,
        ProcessingResponse,
    )

    mutation = None if set_headers is None else _old_mutation(set_headers, remove)
    want = ProcessingResponse(
        request_headers=HeadersResponse(
            response=CommonResponse(header_mutation=mutation, clear_route_cache=clear)
        )
    )
    if skip:
        want.mode_override.request_body_mode = ProcessingMode.NONE
        want.mode_override.response_body_mode = ProcessingMode.NONE
    got = wire.continue_request_headers(
        set_headers, remove, clear_route_cache=clear, skip_bodies=skip
    )
    assert _same(got, want)

    want = ProcessingResponse(
        response_headers=HeadersResponse(response=CommonResponse(header_mutation=mutation))
    )
    assert _same(wire.continue_response_headers(set_headers, remove), want)

    common = CommonResponse(clear_route_cache=clear)
    body = None if skip else b'{"model":"m"}'
    if body is not None:
        common.body_mutation.body = body
    headers = set_headers or {}
    if headers or remove:
        common.header_mutation.CopyFrom(_old_mutation(headers, remove))
    want = ProcessingResponse(request_body=BodyResponse(response=common))
    got = wire.replace_request_body(body, headers, remove, clear_route_cache=clear)
    assert _same(got, want)
    assert got.HasField("request_body") and got.request_body.HasField("response")
