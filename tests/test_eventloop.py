"""`server.event_loop`: which loop a worker really runs on, and a bad value refused."""

from __future__ import annotations

import asyncio
import builtins
import logging

import pytest

from extproc import eventloop
from extproc.config import ConfigError, parse_config

BASE = {
    "providers": {"p": {"url": "http://127.0.0.1:9000"}},
    "routes": [{"name": "r", "prefix": "/", "provider": "p"}],
}


async def _which() -> str:
    await asyncio.sleep(0)
    return eventloop.running()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_worker_runs_on_the_configured_loop(loop: str) -> None:
    assert eventloop.run(_which(), loop) == loop


def test_default_is_uvloop() -> None:
    assert parse_config(BASE).server.event_loop == "uvloop"


def test_without_uvloop_the_worker_logs_and_runs_asyncio(monkeypatch, caplog) -> None:
    real_import = builtins.__import__

    def no_uvloop(name, *args, **kwargs):
        if name == "uvloop":
            raise ImportError("no uvloop here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    with caplog.at_level(logging.WARNING, "extproc.server"):
        assert eventloop.run(_which(), "uvloop") == "asyncio"
    assert "uvloop is not installed" in caplog.text


def test_an_unknown_loop_is_refused_with_its_key() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({**BASE, "server": {"event_loop": "tokio"}})
    text = "\n".join(exc.value.lines())
    assert "server.event_loop" in text and "tokio" in text
