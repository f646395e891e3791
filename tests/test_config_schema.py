"""The policy models are the one declaration of every key: the JSON Schema derived from
them describes the files the loader accepts, docs/configuration.md is generated from it,
and the package validates without importing the policy stages."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from extproc.config import ConfigError, GuardConfig, ServerConfig, load_config, parse_config, schema
from extproc.config.reference import OUT, render

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "config").glob("*.yaml"))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_configuration_reference_is_generated_from_the_models() -> None:
    assert OUT == REPO / "docs" / "configuration.md"
    assert OUT.read_text(encoding="utf-8") == render(), "stale: run `make config-docs`"


def test_reference_lists_every_key_of_every_section() -> None:
    text = render()
    for key in ("grpc_listen", "message_timeout_ms", "on_block", "api_key_file"):
        assert f"| `{key}` |" in text
    # Nested keys are written as a path from their section, with type and default.
    assert "| `jwt.leeway_seconds` | integer 0-600 | `30` |" in text
    assert "| `limits[].match.models` |" in text
    assert "| `rules[].webhook.failure` | `open` \\| `closed` | `closed` |" in text


def test_check_config_schema_prints_the_derived_schema() -> None:
    result = run_cli("check-config", "--schema")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == schema()


def test_check_config_needs_a_file_or_schema() -> None:
    result = run_cli("check-config")
    assert result.returncode == 2
    assert "--schema" in result.stderr


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policies_match_the_schema(path: Path) -> None:
    load_config(str(path))
    jsonschema.validate(yaml.safe_load(path.read_text()), schema())


@pytest.mark.parametrize(
    "change",
    [
        {"envoy": {"mesage_timeout_ms": 5}},  # unknown key
        {"server": {"workers": 0}},  # below the minimum
        {"streaming": {"on_block": "stop"}},  # not a choice
        {"providers": {"mock": {"format": "openai"}}},  # url is required
    ],
)
def test_schema_refuses_what_the_loader_refuses(change: dict) -> None:
    document = {**yaml.safe_load((REPO / "config" / "dev.yaml").read_text()), **change}
    with pytest.raises(Exception):  # noqa: B017 - ConfigError, below
        parse_config(document)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema())


def test_schema_leaves_out_what_a_file_never_writes() -> None:
    defs = schema()["$defs"]
    assert "name" not in defs["ProviderConfig"]["properties"]  # the mapping key names it
    assert "path" not in schema()["properties"]
    assert schema()["required"] == ["providers", "routes"]
    assert defs["GuardsConfig"]["required"] == ["rules"]


def test_models_are_frozen() -> None:
    server = ServerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        server.workers = 2  # type: ignore[misc]
    assert dataclasses.replace(server, workers=2).workers == 2


def test_code_builds_models_without_the_file_rules() -> None:
    # An empty tuple is what code means by "none"; a file must list at least one.
    guard = GuardConfig(name="g", detectors=("email",), patterns=())
    assert guard.patterns == () and guard.phases == ("request", "response")
    with pytest.raises(Exception, match="patterns: expected a non-empty list of patterns"):
        parse_config(
            {
                "providers": {"m": {"url": "http://127.0.0.1:1"}},
                "routes": [{"name": "r", "prefix": "/r", "provider": "m"}],
                "guards": {"rules": [{"name": "g", "detectors": ["email"], "patterns": []}]},
            },
            "p.yaml",
        )


def test_config_imports_no_policy_stage() -> None:
    code = (
        "import json, sys, extproc.config; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('extproc.'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded and not [m for m in loaded if m.startswith("extproc.policy")]


@pytest.mark.parametrize(
    ("section", "key", "reason"),
    [
        (
            {"rate_limits": {"limits": [{"name": "a", "window": "1m", "requests": None}]}},
            "rate_limits.limits[0].requests",
            "expected an integer, got null (empty)",
        ),
        (
            {"guards": {"rules": [{"name": "g", "webhook": None}]}},
            "guards.rules[0].webhook",
            "expected a mapping, got null (empty)",
        ),
        (
            {"routes": [{"name": "r", "prefix": "/r", "provider": "m", "rewrite": None}]},
            "routes[0].rewrite",
            "expected a string, got null (empty)",
        ),
    ],
)
def test_a_key_written_empty_is_refused_not_taken_as_unset(
    section: dict, key: str, reason: str
) -> None:
    base = {
        "providers": {"m": {"url": "http://127.0.0.1:1"}},
        "routes": [{"name": "r", "prefix": "/r", "provider": "m"}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config({**base, **section}, "p.yaml")
    assert (key, reason) in info.value.problems


def test_an_entry_is_named_by_its_key_only() -> None:
    document = {
        "providers": {"m": {"name": "other", "url": "ftp://x"}},
        "routes": [{"name": "r", "prefix": "/r", "provider": "m"}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(document, "p.yaml")
    # The rest of the entry is still checked, in the same run.
    assert info.value.problems == [
        (
            "providers.m.name",
            "unknown key 'name' (known: url, format, api_key_env, api_key_file, ca_file, auth, "
            "project, location, api_version, limits)",
        ),
        ("providers.m.url", "expected an http:// or https:// URL, got 'ftp://x'"),
    ]
