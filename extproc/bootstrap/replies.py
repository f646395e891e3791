"""Envoy's own error replies as OpenAI-style JSON (local_reply_config), leaving the
sidecar's answers, which carry their own JSON, untouched."""

from __future__ import annotations

from typing import Any

from extproc.bootstrap.common import _TYPE, openai_error
from extproc.config import Config
from extproc.errors import SIDECAR_DETAILS_PREFIX


def _status_filter(status: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {
                    "default_value": status,
                    "runtime_key": f"ai_gateway.local_reply.{status}",
                },
            }
        }
    }


def _cel(expression: str) -> dict[str, Any]:
    """An access-log filter on Envoy's attributes, e.g. the reply's reason."""
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": _TYPE + "extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }


def _mapper(
    status: int,
    message: str,
    type_: str,
    code: str,
    *,
    flagged_only: bool = False,
    when: str | None = None,
) -> dict[str, Any]:
    status_filter = _status_filter(status)
    both = [status_filter]
    if flagged_only:  # an empty flag list matches any flag set
        both.append({"response_flag_filter": {}})
    if when:  # a CEL condition, e.g. on Envoy's reason for the reply
        both.append(_cel(when))
    if len(both) > 1:
        status_filter = {"and_filter": {"filters": both}}
    return {
        "filter": status_filter,
        "body_format_override": {
            "json_format": openai_error(message, type_, code),
            "content_type": "application/json",
        },
    }


def local_reply_config(config: Config) -> dict[str, Any]:
    """OpenAI-style JSON for Envoy's own error replies, by status.

    Deliberately no top-level `body_format`: it would rewrite every local reply,
    including the sidecar's immediate responses, which already carry their JSON.
    `%RESPONSE_CODE_DETAILS%` names Envoy's reason (e.g. `ext_proc_error_gRPC_error_14`).
    """
    limit = config.envoy.max_request_bytes
    return {
        "mappers": [
            _mapper(
                400,
                "The request path cannot be normalised (a percent-encoded slash or backslash, a "
                "'#' fragment); send the path plain.",
                "invalid_request_error",
                "invalid_path",
                when="response.code_details == 'path_normalization_failed'",
            ),
            _mapper(
                413,
                f"Request body too large: this gateway accepts at most {limit} bytes.",
                "invalid_request_error",
                "request_too_large",
                # Not the sidecar's own 413 (a guard's scan budget), which says why.
                when=f"!response.code_details.startsWith('{SIDECAR_DETAILS_PREFIX}')",
            ),
            _mapper(
                500,
                "The gateway could not check this request, so it was not sent upstream "
                "(%RESPONSE_CODE_DETAILS%).",
                "server_error",
                "gateway_error",
            ),
            _mapper(
                502,
                "The upstream provider failed (%RESPONSE_CODE_DETAILS%).",
                "server_error",
                "upstream_error",
                flagged_only=True,
            ),
            _mapper(
                503,
                "The upstream provider is unavailable (%RESPONSE_CODE_DETAILS%).",
                "server_error",
                "upstream_unavailable",
                flagged_only=True,  # the sidecar's own 503 (limits store down) stays
                # ... also after failed attempts set a flag (URX): failover's 503.
                when=f"!response.code_details.startsWith('{SIDECAR_DETAILS_PREFIX}')",
            ),
            _mapper(
                504,
                "The gateway timed out (%RESPONSE_CODE_DETAILS%).",
                "server_error",
                "gateway_timeout",
            ),
        ]
    }
