"""docs/spend.md's policy examples validate with the sections they show, until the
config document includes them (then tests/test_docs.py's `policy` marker takes over)."""

from __future__ import annotations

import re

import yaml

from extproc.spend.settings import BudgetsConfig, LedgerConfig, PricesConfig, validate
from tests.conftest import REPO

SECTIONS = {"prices": PricesConfig, "budgets": BudgetsConfig, "ledger": LedgerConfig}


def test_every_yaml_example_in_spend_md_validates():
    text = (REPO / "docs" / "spend.md").read_text(encoding="utf-8")
    seen = []
    for block in re.findall(r"^```yaml\n(.*?)^```$", text, re.S | re.M):
        for key, value in yaml.safe_load(block).items():
            validate(SECTIONS[key], value, where="docs/spend.md", key=key)
            seen.append(key)
    assert sorted(seen) == ["budgets", "ledger", "prices"]
