"""docs/configuration.md, generated from the JSON Schema the models derive: one table
per section, each key with its type, default and meaning (the field's docstring).
`make config-docs` writes it; a test fails when the committed file is stale."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from extproc.config.loader import schema

OUT = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

INTRO = """\
# Configuration reference

<!-- Generated from the policy models by `make config-docs`: edit the field docstrings
in extproc/config/, not this file. -->

One YAML policy file drives the sidecar *and* the Envoy bootstrap rendered from it, so a
route name means the same thing on both sides:

```sh
.venv/bin/extproc check-config policy.yaml            # validate; every problem listed
.venv/bin/extproc check-config --schema               # the file's JSON Schema
.venv/bin/extproc envoy-config policy.yaml -o envoy.yaml
.venv/bin/extproc serve --config policy.yaml          # the sidecar
```

`config/dev.yaml` (what `make run` uses) documents every key with its default, and
`config/openai.yaml` is the same gateway in front of the real OpenAI. Every section
except `providers` and `routes` is optional. Unknown keys are errors, so a typo never
silently falls back to a default: a bad file is refused at start, on reload and by
`check-config`, with every problem as `FILE: key: reason`:

```sh runnable
bad=$(mktemp --suffix .yaml)
cat > "$bad" <<'EOF'
envoy:
  message_timeout: 2000
providers:
  mock: {url: "http://127.0.0.1:9000"}
routes:
  - {name: v1, prefix: /v1/, provider: opnai}
EOF
.venv/bin/extproc check-config "$bad" || echo "exit=$?"
rm -f "$bad"
```
<!-- expect: exit=1 -->

prints, on stderr:

```text
/tmp/tmp.XXXX.yaml: envoy.message_timeout: unknown key 'message_timeout' (did you mean 'message_timeout_ms'?)
/tmp/tmp.XXXX.yaml: routes[0].provider: unknown provider 'opnai' (known: mock)
```

The policy file is watched: a valid change applies without a restart, an invalid one is
refused and the previous policy stays ([production.md](production.md)). Listen
addresses and `workers` need a restart; the `envoy` section, routes and provider URLs
need Envoy's bootstrap rendered again.
"""  # noqa: E501 - the example output is one line per problem

EXAMPLE = """\
## A complete small policy

```yaml policy-file
server:
  grpc_listen: "127.0.0.1:50051"
  metrics_listen: "127.0.0.1:9464"
envoy:
  listen: "0.0.0.0:8080"
  admin: "127.0.0.1:9901"
providers:
  openai: {url: "https://api.openai.com", format: openai, api_key_env: OPENAI_API_KEY}
routes:
  - {name: v1, prefix: /v1/, provider: openai}
consumers:
  team-a:
    keys:
      - {name: prod, env: TEAM_A_KEY}
    models: ["gpt-4o*"]
guards:
  rules:
    - {name: pii, detectors: [pii], action: mask}
rate_limits:
  limits:
    - {name: team-budget, tokens: 200000, window: 1h, by: consumer}
```
"""


def _text(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _code(value: Any) -> str:
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


class _Schema:
    def __init__(self, root: dict[str, Any]) -> None:
        self.defs: dict[str, Any] = root.get("$defs", {})

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        """A property without its `null` alternative, and a `$ref` followed."""
        options = [o for o in node.get("anyOf", ()) if o.get("type") != "null"]
        if len(options) == 1:
            node = {**options[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        ref = node.get("$ref")
        return {**self.defs[ref.rsplit("/", 1)[1]], **node} if ref else node

    def type_of(self, node: dict[str, Any]) -> str:
        node = self.resolve(node)
        if "enum" in node:
            return " \\| ".join(_code(v) for v in node["enum"])
        options = node.get("anyOf")
        if options and len(options) == 2 and options[1].get("items") == options[0]:
            return f"{self.type_of(options[0])}, or a list of them"
        if options:
            return " or ".join(self.type_of(o) for o in options)
        kind = node.get("type")
        if kind == "array":
            return f"list of {self.type_of(node.get('items', {}))}"
        if kind == "object" and "properties" not in node:
            return f"mapping of name to {self.type_of(node.get('additionalProperties', {}))}"
        if kind == "object":
            return "mapping"
        if kind == "integer":
            low, high = node.get("minimum"), node.get("maximum")
            if low is not None and high is not None:
                return f"integer {low}-{high}"
            return f"integer ≥ {low}" if low is not None else "integer"
        if kind == "string" and node.get("format") == "date-time":
            return "date or date-time"
        return {"string": "string", "boolean": "boolean", "number": "number"}.get(kind, "any")

    def rows(self, model: dict[str, Any], prefix: str = "") -> list[str]:
        """Table rows for a model's keys; nested mappings and lists of mappings inline."""
        out: list[str] = []
        required = set(model.get("required", ()))
        for key, node in model.get("properties", {}).items():
            full = prefix + key
            resolved = self.resolve(node)
            if key in required:
                default = "required"
            elif "default" in node and node["default"] not in (None, [], {}, ""):
                default = _code(node["default"])
            else:
                default = ""
            meaning = _text(node.get("description", ""))
            inner, suffix, kind = resolved, ".", "mapping:"
            if resolved.get("type") == "array":
                inner, suffix, kind = self.resolve(resolved.get("items", {})), "[].", "list of:"
            elif isinstance(resolved.get("additionalProperties"), dict):
                inner = self.resolve(resolved["additionalProperties"])
                suffix, kind = ".NAME.", "mapping of name to:"
            if "properties" in inner:
                meaning = meaning or _text(inner.get("description", ""))
                out.append(f"| `{full}` | {kind} | {default} | {meaning} |")
                out += self.rows(inner, full + suffix)
                continue
            out.append(f"| `{full}` | {self.type_of(node)} | {default} | {meaning} |")
        return out

    def section(self, key: str, node: dict[str, Any], required: bool) -> list[str]:
        resolved = self.resolve(node)
        values = resolved.get("additionalProperties")
        items = resolved.get("items")
        model = self.resolve(values or items or resolved)
        summary = _text(node.get("description") or model.get("description", ""))
        lines = [f"## `{key}`" + (" (required)" if required else ""), "", summary, ""]
        if values:
            lines += ["A mapping of name to:", ""]
        elif items:
            lines += ["A list of:", ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        return [*lines, *self.rows(model), ""]


def render() -> str:
    """The whole reference page."""
    root = schema()
    doc = _Schema(root)
    required = set(root.get("required", ()))
    parts = [INTRO]
    for key, node in root["properties"].items():
        parts.append("\n".join(doc.section(key, node, key in required)))
    parts.append(EXAMPLE)
    return "\n".join(parts)


def main() -> int:
    """Write docs/configuration.md (or print it with `-`)."""
    text = render()
    if sys.argv[1:] == ["-"]:
        sys.stdout.write(text)
    else:
        OUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
