"""docs/spend.md shows every spend section as a policy snippet: tests/test_docs.py runs
each `yaml policy` block through `extproc check-config`, so here only that each section
is shown, and that no example escaped the marker (a plain ```yaml block is unchecked)."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO


def test_every_spend_section_is_shown_as_a_checked_policy_snippet():
    text = (REPO / "docs" / "spend.md").read_text(encoding="utf-8")
    assert not re.findall(r"^```yaml\n", text, re.M), "a yaml example without `policy`"
    shown = set()
    for block in re.findall(r"^```yaml policy\n(.*?)^```$", text, re.S | re.M):
        shown |= set(yaml.safe_load(block))
    assert {"prices", "budgets", "ledger"} <= shown
