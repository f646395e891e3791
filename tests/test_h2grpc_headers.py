"""extproc.h2headers: header blocks decode as a fresh `hpack` decoder fed the same bytes
decodes them, whatever the cache of repeated blocks holds; and through the server, the
metadata a handler sees is what the peer sent, stream after stream."""

from __future__ import annotations

import random
import struct

import hpack
import pytest

from bench.h2_bench import FIRST_BLOCK, LATER_BLOCK
from extproc.h2frames import DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, frame
from extproc.h2grpc import MAX_HEADER_BLOCK
from extproc.h2headers import ENTRIES, MAX_CACHED_BLOCK, Head, HeaderDecoder
from tests.h2_helpers import BV, Raw, message, request_headers, running_server

PATH = b"\x04\x05/t/T1"  # :path literal without indexing (static name 4)
ADD_1 = b"\x40\x03x-a\x011"  # x-a: 1, literal with incremental indexing
ADD_2 = b"\x40\x03x-a\x012"
FIRST_DYNAMIC = b"\xbe"  # indexed, 62: the newest dynamic entry
SECOND_DYNAMIC = b"\xbf"  # 63


class Reference:
    """hpack's own decoder, no cache: what every block must decode to."""

    def __init__(self) -> None:
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_BLOCK)

    def decode(self, block: bytes) -> tuple[bytes, tuple] | type[Exception]:
        try:
            head = Head(self.decoder.decode(block, raw=True))
        except Exception as exc:  # hpack's errors
            return type(exc)
        return head.path, head.metadata


def ours(decoder: HeaderDecoder, block: bytes) -> tuple[bytes, tuple] | type[Exception]:
    try:
        head = decoder.decode(block)
    except Exception as exc:
        return type(exc)
    return head.path, head.metadata


def _int(n: int) -> bytes:
    """The continuation bytes of an HPACK integer past its prefix (RFC 7541 5.1)."""
    out = []
    while n >= 128:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def agree(blocks: list[bytes]) -> list:
    """Both decoders over the same blocks, in order; their results, asserted equal."""
    decoder, reference, seen = HeaderDecoder(MAX_HEADER_BLOCK), Reference(), []
    for i, block in enumerate(blocks):
        got, want = ours(decoder, block), reference.decode(block)
        assert got == want, (i, block)
        seen.append(got)
    table = reference.decoder.header_table
    assert list(decoder._table.dynamic_entries) == list(table.dynamic_entries)
    return seen


def test_envoys_blocks_decode_as_hpack_does_and_repeats_come_from_the_cache() -> None:
    decoder = HeaderDecoder(MAX_HEADER_BLOCK)
    agree([FIRST_BLOCK, LATER_BLOCK, LATER_BLOCK, LATER_BLOCK])
    decoder.decode(FIRST_BLOCK)
    head = decoder.decode(LATER_BLOCK)
    assert head.path == b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
    assert head.metadata == (("x-envoy-internal", "true"), ("x-forwarded-for", "192.0.2.2"))
    assert decoder.decode(bytes(bytearray(LATER_BLOCK))) is head  # equal bytes: a hit


def test_a_block_that_changes_the_table_after_a_cached_one() -> None:
    """The same bytes (index 62) name x-a: 1, then, once x-a: 2 was added, x-a: 2."""
    ref = PATH + FIRST_DYNAMIC
    seen = agree([ADD_1, ref, ref, ADD_2, ref, ref, PATH + SECOND_DYNAMIC])
    one, two = (("x-a", "1"),), (("x-a", "2"),)
    assert [s[1] for s in seen] == [one] * 3 + [two] * 3 + [one]


def test_a_block_that_adds_an_entry_is_never_served_from_the_cache() -> None:
    """Twice the same indexing block: two entries, so index 63 exists."""
    seen = agree([PATH + ADD_1, PATH + ADD_1, PATH + SECOND_DYNAMIC])
    assert seen[2] == (b"/t/T1", (("x-a", "1"),))


def test_a_table_size_update_empties_what_a_cached_block_referred_to() -> None:
    """Size 0 then 4096 evicts every entry: the cached reference no longer decodes."""
    ref = PATH + FIRST_DYNAMIC
    evict = b"\x20\x3f\xe1\x1f" + PATH
    seen = agree([ADD_1, ref, ref, evict, ref, ADD_2, ref])
    assert seen[4] is hpack.InvalidTableIndex
    assert seen[6] == (b"/t/T1", (("x-a", "2"),))


def test_a_malformed_block_is_refused_every_time_and_a_cut_cached_one_too() -> None:
    ref = FIRST_DYNAMIC + PATH
    bad = ref + b"\xff\xff\xff\xff\xff\xff"
    seen = agree([ADD_1, ref, bad, bad, ref, ref[:-1], b"\x40\x03x-a\x05ab", ref])
    assert seen[2] is seen[3] is hpack.HPACKDecodingError
    assert seen[5] is seen[6] is hpack.HPACKDecodingError  # truncated
    assert seen[7] == (b"/t/T1", (("x-a", "1"),))


def test_a_block_that_adds_an_entry_then_fails_leaves_no_stale_answer() -> None:
    """The server ends the connection at the error; the decoder stays exact anyway."""
    ref = FIRST_DYNAMIC + PATH
    seen = agree([ADD_1, ref, ref, ADD_2 + b"\xff\xff\xff\xff\xff\xff", ref])
    assert seen[4] == (b"/t/T1", (("x-a", "2"),))


def test_a_header_list_past_the_limit_is_refused_from_a_repeated_block_too() -> None:
    value = b"v" * 4000
    big = b"\x40\x03x-a\x7f" + _int(len(value) - 127)
    bomb = PATH + FIRST_DYNAMIC * 20  # 20 x 4 KB: over the 64 KiB list limit
    seen = agree([big + value, PATH + FIRST_DYNAMIC, bomb, bomb])
    assert seen[2] is seen[3] is hpack.OversizedHeaderListError


def test_blocks_past_the_cache_limits_decode_all_the_same() -> None:
    long = PATH + b"\x00\x03x-b\x7f" + _int(MAX_CACHED_BLOCK - 127) + b"b" * MAX_CACHED_BLOCK
    many = [PATH + b"\x00\x03x-c" + bytes([1]) + bytes([48 + i]) for i in range(3 * ENTRIES)]
    agree([long, long, *many, *many, long])
    decoder = HeaderDecoder(MAX_HEADER_BLOCK)
    assert decoder.decode(long) is not decoder.decode(long)  # too long to be kept
    for block in many * 2:
        decoder.decode(block)
    assert len(decoder._cache) <= ENTRIES


@pytest.mark.parametrize("seed", range(6))
def test_random_blocks_and_replays_of_old_ones_agree_with_hpack(seed: int) -> None:
    """An encoder's blocks (indexing, never-indexed values, table resizes), interleaved
    with replays of earlier blocks under whatever the table holds now."""
    rnd = random.Random(seed)
    encoder = hpack.Encoder()
    names = [f"x-{c}" for c in "abcdefgh"]
    sent: list[bytes] = []
    for _ in range(400):
        roll = rnd.random()
        if sent and roll < 0.35:
            sent.append(rnd.choice(sent[-20:]))
            continue
        if roll < 0.42:
            encoder.header_table_size = rnd.choice([0, 64, 256, 4096])
        headers: list[tuple] = [(":path", f"/t/{rnd.randrange(3)}")]
        for _ in range(rnd.randrange(5)):
            value = "v" * rnd.choice([1, 1, 2, 30, 200])
            headers.append((rnd.choice(names), value, rnd.random() < 0.2))  # never indexed?
        sent.append(encoder.encode(headers, huffman=rnd.random() < 0.5))
    agree(sent)


# -------------------------------------------------------------- through the server


def _unindexed(headers: list[tuple[str, str]]) -> bytes:
    """Literals without indexing, new names: a block that adds nothing to the table."""
    out = b""
    for name, value in headers:
        out += b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
    return out


async def _meta(raw: Raw, sid: int, block: bytes) -> tuple[str, bytes]:
    """One Meta call: its grpc-status and what its handler saw, or the GOAWAY's code."""
    wire = frame(HEADERS, END_HEADERS, sid, block)
    wire += frame(DATA, END_STREAM, sid, message(BV(value=b"").SerializeToString()))
    await raw.send(wire)
    data = b""
    while (got := await raw.read_frame()) is not None:
        kind, flags, stream_id, payload = got
        if kind == GOAWAY:
            return "goaway", struct.pack(">L", struct.unpack(">LL", payload)[1])
        if stream_id == sid and kind == DATA:
            data += payload
        if stream_id == sid and kind == HEADERS and flags & END_STREAM:
            return raw.headers(payload)["grpc-status"], BV.FromString(data[5:]).value
    raise AssertionError("closed")


async def test_the_metadata_a_handler_sees_follows_the_table_stream_after_stream() -> None:
    """Same headers thrice (the last two blocks all references, the third from the
    cache), a new value (the table changes), the first again; a replay of an old block
    decodes under today's table; a size update that empties the table makes the
    cached bytes a COMPRESSION_ERROR."""
    async with running_server() as (port, _calls, _server):
        raw = await Raw.connect(port)
        reference = hpack.Decoder()
        base = request_headers("/t.T/Meta")

        def expected(block: bytes) -> tuple[str, bytes]:
            """What the call answers: Meta's lines, or UNIMPLEMENTED for another path."""
            head = Head(reference.decode(block, raw=True))
            if head.path != b"/t.T/Meta":
                return "12", b""
            return "0", "\n".join(f"{n}: {v}" for n, v in head.metadata).encode("latin-1")

        one = raw.encoder.encode([*base, ("x-a", "1"), ("x-b", "b")])
        assert await _meta(raw, 1, one) == expected(one)
        blocks = [raw.encoder.encode([*base, ("x-a", "1"), ("x-b", "b")]) for _ in range(2)]
        assert blocks[0] == blocks[1] and all(b & 0x80 for b in blocks[0])
        for sid, block in zip((3, 5), blocks, strict=True):
            assert await _meta(raw, sid, block) == ("0", b"x-a: 1\nx-b: b")
            expected(block)
        two = raw.encoder.encode([*base, ("x-a", "2"), ("x-b", "b")])
        assert await _meta(raw, 7, two) == ("0", b"x-a: 2\nx-b: b")
        expected(two)
        again = raw.encoder.encode([*base, ("x-a", "1"), ("x-b", "b")])
        assert await _meta(raw, 9, again) == ("0", b"x-a: 1\nx-b: b")
        expected(again)
        replay = blocks[0]  # its references were x-a: 1 and x-b: b; the table moved on
        want = expected(replay)
        assert await _meta(raw, 11, replay) == want
        assert want != ("0", b"x-a: 1\nx-b: b")
        evict = b"\x20\x3f\xe1\x1f" + _unindexed(base)  # size 0, then 4096 again
        assert await _meta(raw, 13, evict) == ("0", b"")
        assert await _meta(raw, 15, replay) == ("goaway", struct.pack(">L", 9))
        await raw.close()
