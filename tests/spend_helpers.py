"""What the spend e2e tests share: a policy written from scratch (one mock provider,
hand-set prices), the price of a usage worked out by hand, and the ledger's rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import loopback_sections

MODEL = "gpt-4o-mini"
# $ per 1M tokens, set by the policy (so the figures below are the hand computation):
# $R per 1M tokens is R micro-dollars per token.
INPUT, CACHED, OUTPUT, REASONING = 10, 2, 30, 40
PRICES = {
    "unpriced": "refuse",
    "models": [
        {
            "model": MODEL,
            "input": INPUT,
            "cached_input": CACHED,
            "output": OUTPUT,
            "reasoning": REASONING,
        }
    ],
}


def hand_price(usage: dict[str, Any]) -> int:
    """Micro-dollars for an OpenAI usage object at the rates above, by hand: cached
    prompt tokens at the cached rate, the rest at input; reasoning at its rate, the
    rest of the completion at output."""
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return (
        (prompt - cached) * INPUT
        + cached * CACHED
        + (completion - reasoning) * OUTPUT
        + reasoning * REASONING
    )


def write_policy(directory: Path, **sections: Any) -> Path:
    """Envoy + sidecar + the mock on free ports; `sections` are added as written."""
    directory.mkdir(parents=True, exist_ok=True)
    policy: dict[str, Any] = {
        **loopback_sections(directory, shutdown_grace_seconds=2),
        "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
        "prices": PRICES,
        **sections,
    }
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def sqlite_rows(path: Path) -> list[dict[str, Any]]:
    """Every ledger row, read as `extproc spend` reads it (WAL: beside the writer)."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM spend_ledger")]
        except sqlite3.OperationalError:  # not migrated yet
            return []
    finally:
        db.close()
