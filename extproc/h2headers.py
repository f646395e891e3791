"""HPACK decoding of the request header blocks of `extproc.h2grpc`, with a cache of the
blocks that leave the dynamic table as it was.

Why a cache: Envoy opens one gRPC stream per exchange and, once its first stream put
:authority, te, content-type and its own headers in the connection's dynamic table,
sends every later stream the same bytes (indexed references and a Huffman-coded :path,
46 bytes). The `hpack` library decodes them in pure Python, about 30 µs a stream: more
than the rest of opening the stream.

Why it is exact: decoding is a function of the block's bytes and the dynamic table
(its entries and size; the limits are fixed per connection). A block is cached only if
decoding it changed nothing in the table, and served only while nothing has changed the
table since (every change counts; any change empties the cache). So serving a block
from the cache gives what decoding it again would, to the byte, and leaves the table as
decoding would. A block that does not decode raises, and is never cached.
"""

from __future__ import annotations

import hpack
from hpack.table import HeaderTable

# A cached block's bytes: Envoy's are 46 to a few hundred. The cache holds at most
# ENTRIES blocks (Envoy multiplexes up to three filters' streams on one connection:
# router, upstream and observing ext_proc), so its memory is bounded per connection.
MAX_CACHED_BLOCK = 1024
ENTRIES = 8


class _CountedTable(HeaderTable):
    """hpack's dynamic table, counting every change: an insertion (with any eviction it
    causes) and a size update."""

    def __init__(self) -> None:
        super().__init__()
        self.changes = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.changes += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.changes += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


class Head:
    """What the server reads of a request's headers: the method's path and the
    invocation metadata (pseudo-headers, content-type and te left out)."""

    __slots__ = ("metadata", "path")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        path = b""
        metadata = []
        for name, value in headers:
            if name == b":path":
                path = value
            elif not name.startswith(b":") and name not in (b"content-type", b"te"):
                metadata.append((name.decode("latin-1"), value.decode("latin-1")))
        self.path = path
        self.metadata = tuple(metadata)


class HeaderDecoder:
    """One connection's HPACK decoding context (RFC 7541), header blocks to `Head`s."""

    __slots__ = ("_cache", "_decoder", "_seen", "_table")

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._table = self._decoder.header_table = _CountedTable()
        self._cache: dict[bytes, Head] = {}
        self._seen = 0  # the table's change count the cache's entries were decoded under

    def decode(self, block: bytes) -> Head:
        """The block's `Head`; raises hpack's errors (the connection's table is lost)."""
        table, cache = self._table, self._cache
        if table.changes != self._seen:  # what the cache holds was decoded under another table
            cache.clear()
            self._seen = table.changes
        head = cache.get(block)
        if head is not None:
            return head
        head = Head(self._decoder.decode(block, raw=True))
        if table.changes == self._seen and len(block) <= MAX_CACHED_BLOCK:  # table unchanged
            if len(cache) >= ENTRIES:
                cache.clear()
            cache[block] = head
        return head
