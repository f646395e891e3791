"""bench/servicer_bench.py drives the real servicers over its stand-in gRPC context."""

from __future__ import annotations

import asyncio

import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse

from bench import servicer_bench
from bench.exchange_bench import exchange_messages


@pytest.mark.parametrize("setup", ["meter", "full"])
def test_every_message_of_an_exchange_is_answered_as_through_envoy(setup: str) -> None:
    raw = [m.SerializeToString() for m in exchange_messages(setup, 3, "gapped")]
    context = servicer_bench.Context(raw, servicer_bench.Evictor(64))
    asyncio.run(servicer_bench.servicer(setup).Process(context))
    assert context.answers == len(raw)  # no refusal: auth, guards and limits let it through
    assert context.written > 0


def test_the_stand_in_reads_to_eof_and_parses_each_message() -> None:
    raw = [m.SerializeToString() for m in exchange_messages("meter", 1, "coalesced")]
    context = servicer_bench.Context(raw, None)

    async def read_all() -> list:
        out = []
        while (message := await context.read()) is not servicer_bench.EOF:
            out.append(message.WhichOneof("request"))
        return out

    kinds = asyncio.run(read_all())
    assert kinds == ["request_headers", "request_body", "response_headers", "response_body"]
    asyncio.run(context.write(ProcessingResponse()))
    assert context.answers == 1


def test_the_report_names_every_setup_with_its_added_cost(capsys) -> None:
    args = ["--setups", "meter", "--shapes", "gapped", "--chunks", "2", "--n", "2"]
    assert servicer_bench.main([*args, "--rounds", "2", "--evict", "64"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["noop", "gapped"], ["meter", "gapped"]]
    assert float(rows[0][4]) == 0.0 and float(rows[1][3]) > 0  # the floor, and µs per message
