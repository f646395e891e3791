"""A failover answer from a target in another API: the router-level stream learns at
the response headers which target answered, so the answer's translation is chosen
there (the request was translated by that attempt's upstream filter)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from extproc.exchange.translated import Translated
from extproc.failover.plan import STASH_KEY
from extproc.providers import format_for
from extproc.translate.base import RequestError

if TYPE_CHECKING:
    from extproc.exchange.core import Exchange
    from extproc.policy.stage import RequestContext


def adopt(ex: Exchange, ctx: RequestContext) -> None:
    """Read the answer as `ctx.answered_by`'s target API and write it in the client's,
    as a translated exchange does (`exchange.translated`)."""
    translator, model = ctx.answered_by
    info = ctx.info
    assert info is not None
    body = dict(info.body)
    body.pop(STASH_KEY, None)
    if not info.client_wants_usage:  # the gateway's own include_usage: not the client's
        body.pop("stream_options", None)
    try:
        upstream = translator.request(body, model)
    except RequestError:  # the attempt translated it: not reached
        return
    answer = translator.response(upstream, created=int(time.time()))
    if answer is None:  # the same API on another path (Azure): read as native
        return
    ex.translator = answer
    ex.flow = Translated(format_for(ctx.provider.format), upstream)
    ex.metrics.translations.labels(translator.source, translator.target).inc()
    ctx.metadata["provider"] = ctx.provider.name
    ctx.metadata["upstream_format"] = translator.target
