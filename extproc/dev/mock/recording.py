"""What the mock saw and sent, per request, behind `/_mock/exchanges`: tests read it
to assert on the bytes the gateway forwarded and how far an answer got."""

from __future__ import annotations

import base64
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

MAX_EXCHANGES = 1000
JSON_CONTENT_TYPE = "application/json"


@dataclass(slots=True)
class Exchange:
    """One request as the mock saw it. `sent` is the whole answer it meant to send;
    `bytes_written`, `completed` and `client_went_away` say how far it got, so a test
    can tell a provider stream that was closed early from one that ran to its end
    without timing anything."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    sent: bytes
    status: int
    bytes_written: int = 0
    completed: bool = False  # every byte written and the body ended
    client_went_away: bool = False  # the peer (Envoy) closed before the body ended

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body_b64": base64.b64encode(self.body).decode(),
            "sent_b64": base64.b64encode(self.sent).decode(),
            "status": self.status,
            "bytes_written": self.bytes_written,
            "completed": self.completed,
            "client_went_away": self.client_went_away,
        }


class ExchangeLog:
    """The bounded log, keyed by `x-mock-request-id` (or `auto-N`), oldest first."""

    def __init__(self) -> None:
        self.exchanges: OrderedDict[str, Exchange] = OrderedDict()
        self._auto_id = 0

    def record(self, request: web.Request, body: bytes, sent: bytes, status: int) -> Exchange:
        """Log an exchange under `x-mock-request-id` (or an automatic id); a whole
        (non-streamed) answer counts as written at once."""
        key = request.headers.get("x-mock-request-id")
        if key is None:
            self._auto_id += 1
            key = f"auto-{self._auto_id}"
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            lname = name.lower()
            headers[lname] = f"{headers[lname]},{value}" if lname in headers else value
        self.exchanges.pop(key, None)
        exchange = self.exchanges[key] = Exchange(
            request.method,
            request.path,
            request.query_string,
            headers,
            body,
            sent,
            status,
            bytes_written=len(sent),
            completed=True,
        )
        while len(self.exchanges) > MAX_EXCHANGES:
            self.exchanges.popitem(last=False)
        return exchange

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/_mock/exchanges", self.list_exchanges)
        app.router.add_delete("/_mock/exchanges", self.clear_exchanges)
        app.router.add_get("/_mock/exchanges/{id}", self.get_exchange)

    async def get_exchange(self, request: web.Request) -> web.Response:
        exchange = self.exchanges.get(request.match_info["id"])
        if exchange is None:
            return web.json_response({"error": "unknown exchange"}, status=404)
        return web.Response(body=orjson.dumps(exchange.to_json()), content_type=JSON_CONTENT_TYPE)

    async def list_exchanges(self, request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps({"ids": list(self.exchanges)}), content_type=JSON_CONTENT_TYPE
        )

    async def clear_exchanges(self, request: web.Request) -> web.Response:
        self.exchanges.clear()
        return web.Response(body=b'{"cleared":true}', content_type=JSON_CONTENT_TYPE)
