"""The documentation cannot drift from the code: every example marked runnable in
README.md and docs/*.md is run against the stack `make run` starts (config/dev.yaml,
on free ports), every policy snippet is checked by `extproc check-config`, and every
relative link resolves.

Markers (see docs/development.md): a fence ```` ```sh runnable ```` (or ``bash``,
``python``) is run; `<!-- expect: TEXT -->` lines right after its closing fence name
text its output must contain. A fence ```` ```yaml policy ```` is a policy snippet laid
over config/dev.yaml section by section; ```` ```yaml policy-file ```` is a whole file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from extproc import cli
from extproc.dev.devstack import Stack
from tests.conftest import DEV_CONFIG, REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250

MARKERS = {"runnable", "policy", "policy-file"}
FENCE = re.compile(r"^```(\w*)(.*)$")
EXPECT = re.compile(r"^<!--\s*expect:\s?(.*?)\s*-->$")
# Documented ports of `make run` (config/dev.yaml): Envoy, metrics, admin, mock, sidecar.
ADDRESS = re.compile(r"\b(?:localhost|127\.0\.0\.1):(\d+)\b")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    tags: tuple[str, ...]
    body: str
    expects: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the expect markers after it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang, tags = i, m.group(1), tuple(m.group(2).split())
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{path}:{start + 1}: fence never closed"
        i += 1
        expects: list[str] = []
        while i < len(lines) and (e := EXPECT.match(lines[i])):
            expects.append(e.group(1))
            i += 1
        out.append(Block(path, start + 1, lang, tags, "\n".join(body) + "\n", tuple(expects)))
    return out


ALL = [b for path in DOCS for b in blocks(path)]
RUNNABLE = [b for b in ALL if "runnable" in b.tags]
POLICIES = [b for b in ALL if b.lang == "yaml" and {"policy", "policy-file"} & set(b.tags)]


def test_markers_are_known() -> None:
    """A typo in a marker would silently turn a checked example into prose."""
    for b in ALL:
        assert set(b.tags) <= MARKERS, f"{b.id}: unknown tags {b.tags}"
        if "runnable" in b.tags:
            assert b.lang in ("sh", "bash", "python"), f"{b.id}: cannot run {b.lang!r}"
        if b.expects:
            assert "runnable" in b.tags, f"{b.id}: expect markers on a block that never runs"
    assert len(RUNNABLE) >= 10 and len(POLICIES) >= 8  # the extraction found the examples


def localize(text: str, stack: Stack) -> str:
    """Point the documented `make run` addresses at the test stack's free ports."""
    ports = {
        "8080": stack.config.envoy.listen,
        "9464": stack.config.server.metrics_listen,
        "9901": stack.config.envoy.admin,
        "9000": (stack.mock_url or "").removeprefix("http://"),
        "50051": stack.config.server.grpc_listen,
    }

    def swap(m: re.Match[str]) -> str:
        assert m.group(1) in ports, f"{m.group(0)} is not an address `make run` serves"
        return ports[m.group(1)]

    return ADDRESS.sub(swap, text)


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_runnable_block(block: Block, stack: Stack) -> None:
    code = localize(block.body, stack)
    if block.lang == "python":
        argv = [sys.executable, "-c", code]
    else:
        argv = ["bash", "-c", "set -euo pipefail\n" + code]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{block.id} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    for expected in block.expects:
        assert expected in proc.stdout, f"{block.id}: {expected!r} not in:\n{proc.stdout}"


def policy_file(block: Block) -> dict:
    """The snippet as a whole policy: as is, or laid over config/dev.yaml."""
    snippet = yaml.safe_load(block.body)
    assert isinstance(snippet, dict), f"{block.id}: not a YAML mapping"
    if "policy-file" in block.tags:
        return snippet
    config = yaml.safe_load(DEV_CONFIG.read_text())
    for key, value in snippet.items():
        if key in ("providers", "consumers") and isinstance(value, dict):
            config[key] = {**config.get(key, {}), **value}
        else:
            config[key] = value
    return config


@pytest.mark.parametrize("block", POLICIES, ids=lambda b: b.id)
def test_policy_snippet(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # `extproc check-config` in this process (an interpreter per snippet cost 1-4 s);
    # test_a_bad_policy_snippet_is_refused runs the command itself.
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_file(block), sort_keys=False))
    monkeypatch.chdir(REPO)  # where the command runs: relative paths resolve alike
    code = cli.main(["check-config", str(path)])
    assert code == 0, f"{block.id}: check-config refused it:\n{capsys.readouterr().err}"
    assert f"{path}: OK" in capsys.readouterr().out


def test_a_bad_policy_snippet_is_refused(tmp_path: Path) -> None:
    """The snippet check can fail: a misspelt key in a documented snippet is caught."""
    block = Block(REPO / "README.md", 1, "yaml", ("policy",), "streaming:\n  on_blok: drain\n", ())
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_file(block)))
    proc = subprocess.run(
        [sys.executable, "-m", "extproc", "check-config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "on_blok" in proc.stderr


LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|^\[[^\]]+\]:\s*(\S+)", re.M)


def links(path: Path) -> list[str]:
    """Link targets outside fenced blocks and inline code."""
    text, prose = path.read_text(encoding="utf-8"), []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            prose.append(re.sub(r"`[^`]*`", "", line))
    return [a or b for a, b in LINK.findall("\n".join(prose))]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#+\s+(.*)$", line)):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    for target in links(path):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{path.relative_to(REPO)}: broken link {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{path.relative_to(REPO)}: no #{anchor} there"


def test_every_guide_is_in_the_index() -> None:
    index = {(REPO / "docs" / t).resolve() for t in links(REPO / "docs" / "README.md")}
    for path in DOCS[1:]:
        if path.name != "README.md":
            assert path.resolve() in index, f"docs/README.md does not link {path.name}"


def test_readme_is_short() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move reference to docs/"


def test_docs_speak_to_users() -> None:
    """No development-process wording ("where the issue is silent") in user docs."""
    for path in DOCS:
        text = path.read_text(encoding="utf-8").lower()
        for phrase in ("the issue", "where silent", "is silent"):
            assert phrase not in text, f"{path.relative_to(REPO)} says {phrase!r}"
