"""Gemini's and Vertex's paths (the model and the action live there, not in the body)
and its error shape (google.rpc.Status), shared by the wire format and the mock."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from extproc.providers._common import path_only

# google.rpc status names by HTTP status, as Google APIs send them.
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_ACTIONS = ("generateContent", "streamGenerateContent")


def names_path_model(named: Any, model: str, path: str) -> bool:
    """Whether a body's `model` is the path's: the id, `models/{id}`, or the path's
    whole resource name (`projects/.../models/{id}`, as Vertex writes it)."""
    if not isinstance(named, str):
        return False
    return named in (model, f"models/{model}") or f"/{unquote(named)}:" in unquote(path)


def model_and_action(path: str) -> tuple[str, str] | None:
    """`.../models/{model}:{action}` -> (model, action), None for other paths."""
    last = path_only(path).rstrip("/").rsplit("/", 1)[-1]
    model, colon, action = unquote(last).rpartition(":")
    if not colon or not model or action not in _ACTIONS:
        return None
    return model, action


def error_json(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """A google.rpc.Status error object; the gateway's code rides in ErrorInfo."""
    error: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": STATUS_NAMES.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT"),
    }
    if code:
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": code,
                "domain": "ai-gateway",
            }
        ]
    return {"error": error}
