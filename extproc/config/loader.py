"""Policy file -> validated Config, or every problem in it at once.

One YAML file drives the sidecar *and* the Envoy bootstrap it ships with, so a route
name means the same thing on both sides. Every error names the file, the key path
(`routes[1].provider`) and the reason, so an operator can fix a ConfigMap without
reading code. Three passes: YAML (duplicate keys refused, line and column), the
models (types, constraints, keys between each other), then references across
entries; checks of the whole valid policy (models that exist, workers) come last.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from extproc.config.access import check_access
from extproc.config.base import (
    LOADING,
    ConfigError,
    Loc,
    describe,
    key_of,
    problems_of,
    unknown_key,
)
from extproc.config.document import SECTIONS, Config, check_workers
from extproc.config.refs import check_document
from extproc.spend.settings import check_spend

_CONFIG = TypeAdapter(Config)


def parse_config(document: Any, path: str = "<config>") -> Config:
    """Validate an already-loaded YAML document; raise ConfigError listing every problem."""
    if document is None:
        raise ConfigError(
            path, [("", "file is empty; expected a mapping with providers and routes")]
        )
    if not isinstance(document, dict):
        reason = (
            f"expected a mapping at the top level (providers:, routes:), got {describe(document)}"
        )
        raise ConfigError(path, [("", reason)])
    problems: list[tuple[Loc, str]] = []
    config = None
    written = {key: value for key, value in document.items() if key in SECTIONS}
    problems += [
        ((str(key),), unknown_key(key, SECTIONS)) for key in document if key not in written
    ]
    try:
        config = _CONFIG.validate_python({**written, "path": path}, context={LOADING: True})
    except ValidationError as exc:
        problems += problems_of(exc)
    problems += check_document(written, {loc for loc, _ in problems})
    if problems:
        rank = {key: index for index, key in enumerate(SECTIONS)}
        problems.sort(key=lambda item: rank.get(item[0][0], -1) if item[0] else -1)
        raise ConfigError(path, [(key_of(loc), reason) for loc, reason in problems])
    assert config is not None
    late = check_access(config) + check_spend(config) + check_workers(config, config.server.workers)
    if late:
        raise ConfigError(path, late)
    return config


def schema() -> dict[str, Any]:
    """The policy file's JSON Schema, as pydantic derives it from the models."""
    derived = _CONFIG.json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **derived}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one,
    which hides a second `routes:` pasted into a ConfigMap)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key_node.value}' (first on line {seen[ident]})",
                    key_node.start_mark,
                )
            seen[ident] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, str]:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    reason = f"invalid YAML: {problem}" + (f" ({context})" if context else "")
    if mark is None:
        return "", reason
    return f"line {mark.line + 1}, column {mark.column + 1}", reason


def load_config(path: str, data: bytes | None = None) -> Config:
    """Read and validate one policy file; raise ConfigError naming file, key and reason.

    `data` is the file's content when the caller has read it already (the reloader
    validates exactly the bytes it fingerprinted); errors still name `path`.
    """
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
    except FileNotFoundError:
        raise ConfigError(path, [("", "file not found")]) from None
    except IsADirectoryError:
        raise ConfigError(path, [("", "is a directory, expected a YAML file")]) from None
    except OSError as exc:
        raise ConfigError(path, [("", f"cannot read file: {exc.strerror or exc}")]) from None
    try:
        document = yaml.load(data, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(path, [_yaml_problem(exc)]) from None
    return parse_config(document, path)
