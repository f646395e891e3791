"""The HELP of `ai_gateway_errors_total` names every kind the code counts, and no other.

The kinds are found in the source, not in a list kept by hand: every string that can
reach the `kind` label, read with `ast` from the places a kind is born (`Refusal(...,
kind=)`, `StreamBlocked(...)`, `end_stream(...)`, `errors.labels(...)`, a
`StreamError` subclass's `kind`, `getattr(exc, "kind", default)`), with module
constants and `{status: kind}` tables resolved. Refusals with a status below 400 (a
model list the gateway answers itself) are not counted, so they are not kinds.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from prometheus_client import generate_latest

from extproc.metrics import Metrics
from extproc.policy.stage import Refusal, StreamBlocked

EXTPROC = Path(__file__).resolve().parent.parent / "extproc"


def _default(function: object, name: str) -> str:
    return inspect.signature(function).parameters[name].default


class _Kinds:
    """Collects the kinds of one source tree."""

    def __init__(self, trees: list[ast.Module]) -> None:
        self.trees = trees
        self.constants: dict[str, set[str]] = {}  # NAME -> values (module level)
        self.tables: dict[str, ast.Dict] = {}  # NAME -> {...} (the module being read)
        # Tables by module: two modules may each have a private `_KINDS`.
        self.module_tables: dict[int, dict[str, ast.Dict]] = {}
        for tree in trees:
            own = self.module_tables[id(tree)] = {}
            for node in tree.body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target = node.targets[0]
                    if not isinstance(target, ast.Name):
                        continue
                    value = node.value
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        self.constants.setdefault(target.id, set()).add(value.value)
                    elif isinstance(value, ast.Dict):
                        own[target.id] = value
        self.found: set[str] = set()
        self.local: dict[str, list[ast.expr]] = {}  # the function being read: name -> values
        self._resolving: set[str] = set()

    def resolve(self, node: ast.expr | None) -> set[str]:
        """The strings `node` can be; empty for a pass-through (a variable, `x.kind`)."""
        if node is None:
            return set()
        if isinstance(node, ast.Constant):
            return {node.value} if isinstance(node.value, str) else set()
        if isinstance(node, ast.Name):
            values = set(self.constants.get(node.id, ()))
            if node.id not in self._resolving:  # `kind = kind or code` must not loop
                self._resolving.add(node.id)
                for value in self.local.get(node.id, ()):
                    values |= self.resolve(value)
                self._resolving.discard(node.id)
            return values
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            table = node.func.value
            if node.func.attr == "get" and isinstance(table, ast.Name) and table.id in self.tables:
                values = set()
                for value in self.tables[table.id].values:
                    values |= self.resolve(value)
                return values | self.resolve(node.args[1] if len(node.args) > 1 else None)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) == 3
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value == "kind"
        ):
            return self.resolve(node.args[2])
        return set()

    def collect(self) -> set[str]:
        for tree in self.trees:
            self.tables = self.module_tables[id(tree)]
            scopes: list[ast.AST] = [tree]
            scopes += [
                n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            ]
            for scope in scopes:
                self.local = {}
                if scope is not tree:  # `kind = table.get(...)`, then `Refusal(kind=kind)`
                    for node in ast.walk(scope):
                        if isinstance(node, ast.Assign):
                            for target in node.targets:
                                if isinstance(target, ast.Name):
                                    self.local.setdefault(target.id, []).append(node.value)
                for node in ast.walk(scope):
                    if isinstance(node, ast.ClassDef):
                        self._class(node)
                    elif isinstance(node, ast.Call):
                        self._call(node)
        return self.found

    def _class(self, node: ast.ClassDef) -> None:
        """`kind = "..."` in a class body: a StreamError subclass's label."""
        for statement in node.body:
            if isinstance(statement, ast.Assign) and [
                t.id for t in statement.targets if isinstance(t, ast.Name)
            ] == ["kind"]:
                self.found |= self.resolve(statement.value)

    def _call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        keywords = {k.arg: k.value for k in node.keywords}

        def argument(position: int, keyword: str) -> ast.expr | None:
            if keyword in keywords:
                return keywords[keyword]
            return node.args[position] if len(node.args) > position else None

        if name == "Refusal" and node.args:
            status = node.args[0]
            if isinstance(status, ast.Constant) and status.value < 400:
                return  # answered by the gateway, never counted as an error
            kind = keywords.get("kind")  # keyword-only
            self.found |= self.resolve(kind) if kind else {_default(Refusal, "kind")}
        elif name == "StreamBlocked":
            kind = argument(2, "kind")
            self.found |= self.resolve(kind) if kind else {_default(StreamBlocked, "kind")}
        elif name in ("_end_stream", "end_stream"):  # `Exchange.end_stream` since issue 15
            kind = argument(4, "kind")  # (message, code, now, end, kind=None): kind or code
            self.found |= self.resolve(kind) if kind else self.resolve(argument(1, "code"))
        elif (
            name == "labels"
            and isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Attribute)
            and func.value.attr == "errors"
        ):
            self.found |= self.resolve(node.args[0] if node.args else None)


def kinds_in_code(root: Path = EXTPROC) -> set[str]:
    trees = [
        ast.parse(path.read_text(), str(path))
        for path in sorted(root.rglob("*.py"))
        if "_gen" not in path.parts
    ]
    return _Kinds(trees).collect()


def errors_help() -> str:
    text = generate_latest(Metrics().registry).decode()
    (line,) = [x for x in text.splitlines() if x.startswith("# HELP ai_gateway_errors_total ")]
    return line


def listed(help_line: str) -> set[str]:
    """The kinds a HELP line names: the comma-separated list in its parentheses."""
    match = re.search(r"\(([^)]*)\)", help_line)
    assert match, help_line
    return {word.strip() for word in match.group(1).split(",")}


def test_the_scan_finds_kinds_by_every_route_a_kind_takes() -> None:
    """The scanner itself: one kind per way a kind reaches the label, so an empty or
    partial scan cannot pass the test below by finding nothing to check."""
    found = kinds_in_code()
    assert {
        "internal",  # errors.labels("...") in server.py
        "rate_limited",  # Refusal(kind="...")
        "guard_budget_exceeded",  # kind=BUDGET_CODE (a constant imported from another module)
        "guard_blocked",  # kind=KIND (a module constant)
        "auth_unavailable",  # kind=_KINDS.get(status, "auth") (a table)
        "auth",  # the table's default
        "malformed_stream",  # class CorruptEventStream(StreamError): kind = "..."
        "frame_too_large",  # class FrameTooLarge(StreamError): kind = "..."
        "decode_error",  # end_stream(message, "decode_error", ...): the code is the kind
    } <= found
    assert "models" not in found  # Refusal(200, ...): answered, not an error


def test_scan_sees_a_new_kind(tmp_path: Path) -> None:
    """A kind added anywhere shows up, so the HELP test below would fail on it."""
    (tmp_path / "new.py").write_text(
        "LIMIT = 'quota_gone'\n"
        "def f(self):\n"
        "    raise Refusal(402, 'm', 'c', kind=LIMIT)\n"
        "def g(self):\n"
        "    self.metrics.errors.labels('cache_miss').inc()\n"
        "    return Refusal(200, 'list', None, kind='listing')\n"
        "def h():\n"
        "    raise Refusal(400, 'm', 'c')\n"
    )
    assert kinds_in_code(tmp_path) == {"quota_gone", "cache_miss", "policy"}


def test_errors_help_lists_every_kind_the_code_counts() -> None:
    help_line = errors_help()
    missing = kinds_in_code() - listed(help_line)
    assert not missing, f"kinds counted in code but not in the HELP: {sorted(missing)}"


def test_errors_help_lists_no_kind_the_code_never_counts() -> None:
    stale = listed(errors_help()) - kinds_in_code()
    assert not stale, f"kinds in the HELP that no code counts: {sorted(stale)}"
