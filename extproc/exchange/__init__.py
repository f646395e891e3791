"""One HTTP exchange as Envoy reports it: ProcessingRequest in, ProcessingResponse out.

Sans-I/O: no gRPC, sockets or clocks in here (the server passes `now`), so every hard
case is a plain unit test. The phases arrive in order: request headers, request body
(BUFFERED, whole JSON), response headers, response body (STREAMED, one message per
chunk, exactly one answer each). Decisions belong to the policy stages (auth, models,
guards, limits); this package applies them to the protocol, and speaks to Envoy only
through `extproc.envoy_wire`.

The modules, in the order an exchange meets them:
  core.py      `Exchange`: its state, the one dispatch on the message kind, refusals
  request.py   request headers and body: route, path checks, stages, upstream changes
  response.py  response headers and body chunks: decoder choice, framing, filters
  settle.py    the end: usage metered, metrics, the access-log metadata, stage settlement

A path the gateway does not inspect gets the pass-through null object (`PASS_THROUGH`
for the flow, `PASS_BODY` for the chunks), never a flag tested in every phase.

The response body rule: a chunk whose bytes are all complete, untouched frames is
answered with no mutation (the cheap, byte-exact default); otherwise the chunk is
replaced by exactly the bytes the client should get now, and an unfinished frame waits
for its end. Once the response has started, a problem can no longer change the status:
the stream is ended with the format's error event and later chunks are cleared
(`streaming.on_block: drain`), or the next chunk is answered with an ImmediateResponse,
which makes Envoy close the provider's stream and reset the client's (`close`).
"""

from extproc.exchange.core import Exchange

__all__ = ["Exchange"]
