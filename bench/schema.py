"""The shape of bench/results/*.json (JSON Schema), checked before a run writes it, so
the docs' plot and anything else reading the files can rely on it."""

from __future__ import annotations

from typing import Any

import jsonschema

SCHEMA_VERSION = 2

_NUM = {"type": "number"}
_OPT_NUM = {"type": ["number", "null"]}
_PCT = {
    "type": "object",
    "required": ["n"],
    "properties": {"n": {"type": "integer"}, **dict.fromkeys(("mean", "p50", "p90", "p99"), _NUM)},
}
_CLIENT = {
    "type": "object",
    "required": ["concurrency", "shape", "completed", "requests_per_s", "frames", "errors",
                 "first_error", "chunk_ms", "ttfb_ms", "client_cpu_s"],
    "properties": {
        "concurrency": {"type": "integer", "minimum": 1},
        "shape": {"enum": ["gapped", "coalesced"]},
        "completed": {"type": "integer", "minimum": 0},
        "requests_per_s": _NUM,
        "frames": {"type": "integer", "minimum": 0},
        "errors": {"type": "object", "additionalProperties": {"type": "integer"}},
        "first_error": {"type": "string"},
        "chunk_ms": _PCT,
        "ttfb_ms": _PCT,
        "client_cpu_s": _NUM,
    },
}  # fmt: skip
_MEMORY = {
    "type": ["object", "null"],
    "required": ["rss_bytes", "open_streams", "rss_idle_bytes"],
    "properties": {"rss_bytes": _NUM, "open_streams": _NUM, "rss_idle_bytes": _NUM},
}
RUN = {
    "type": "object",
    "required": ["client", "gap_ms", "cpu_s", "extproc_messages", "envoy_extproc_messages_sent",
                 "extproc_cpu_us_per_message", "extproc_messages_per_s",
                 "proxy_cpu_us_per_request", "proxy_cpu_us_per_chunk", "memory", "host_busy",
                 "other_cpu_cores", "wall_s"],
    "properties": {
        "client": _CLIENT,
        "gap_ms": _NUM,
        "cpu_s": {"type": "object", "required": ["envoy", "extproc", "provider", "client"],
                  "additionalProperties": _NUM},
        "extproc_messages": {"type": ["integer", "null"]},
        "envoy_extproc_messages_sent": {"type": "integer"},
        "extproc_cpu_us_per_message": _OPT_NUM,
        "extproc_messages_per_s": _OPT_NUM,
        "proxy_cpu_us_per_request": _OPT_NUM,
        "proxy_cpu_us_per_chunk": _OPT_NUM,
        "extproc_cpu_us_per_chunk": _OPT_NUM,
        "memory": _MEMORY,
        "host_busy": _NUM,
        "other_cpu_cores": _NUM,
        "wall_s": _NUM,
    },
}  # fmt: skip
_RUNS_BY = {
    "type": "object",
    "additionalProperties": {"type": "object", "additionalProperties": RUN},
}
TARGET = {
    "type": "object",
    "required": ["id", "name", "value", "unit", "op", "limit", "pass", "note"],
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z0-9_]+$"},
        "name": {"type": "string"},
        "value": _OPT_NUM,
        "unit": {"enum": ["x", "ms", "KiB"]},
        "op": {"enum": ["<=", "<", ">="]},
        "limit": _NUM,
        "pass": {"type": ["boolean", "null"]},
        "note": {"type": "string"},
        # --rounds N > 1: each round's value, in round order (`value` is their median)
        "rounds": {"type": "array", "minItems": 2, "items": _OPT_NUM},
    },
    "additionalProperties": False,
}
# --rounds N > 1: one round's main runs, raw (`results` is then the rounds' medians).
ROUND = {
    "type": "object",
    "required": ["order", "results", "failures"],
    "properties": {
        "order": {"type": "array", "items": {"type": "string"}},
        "results": _RUNS_BY,
        "failures": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_PROFILE = {
    "type": "object",
    "required": ["samples", "groups", "top"],
    "properties": {
        "samples": {"type": "integer"},
        "groups": {"type": "object", "additionalProperties": {"type": "integer"}},
        "top": {"type": "array", "items": {
            "type": "object", "required": ["frame", "group", "samples"]}},
    },
}  # fmt: skip
REPORT = {
    "type": "object",
    "required": ["schema", "meta", "results", "sweep", "workers", "failures", "derived",
                 "targets", "profiles"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "meta": {
            "type": "object",
            "required": ["when", "commit", "host_desc", "cpus", "cpu_model", "python",
                         "envoy_version", "concurrency", "duration_s", "frames", "gap_ms",
                         "setups", "shapes", "sweep_levels", "sweep_frames_per_s",
                         "workers_levels", "quick", "wall_s"],
            "properties": {
                "cpus": {"type": "integer", "minimum": 1},
                "concurrency": {"type": "integer", "minimum": 1},
                "setups": {"type": "array", "items": {"type": "string"}},
                "shapes": {"type": "array", "items": {"enum": ["gapped", "coalesced"]}},
                "sweep_levels": {"type": "array", "items": {"type": "integer"}},
                "workers_levels": {"type": "array", "items": {"type": "integer"}},
                "quick": {"type": "boolean"},
                "rounds": {"type": "integer", "minimum": 1},
            },
        },
        "results": _RUNS_BY,
        "sweep": _RUNS_BY,
        "workers": {"type": "object", "additionalProperties": RUN},
        "failures": {"type": "object", "additionalProperties": {"type": "string"}},
        "derived": {"type": "object"},
        "targets": {"type": "array", "items": TARGET},
        "profiles": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": _PROFILE}},
        "rounds": {"type": "array", "minItems": 2, "items": ROUND},
    },
}  # fmt: skip


def validate(report: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when the report does not have the promised shape."""
    jsonschema.validate(report, REPORT)
