"""The mock's refusals: one error type (the gateway's RequestError plus OpenAI's
`type`), the answers of `x-mock-status`, and validation through the gateway's parsers."""

from __future__ import annotations

from typing import Any

import orjson

from extproc.providers import RequestError, WireFormat

# OpenAI's (type, code, message) per status, used by `x-mock-status`.
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Bad request (x-mock-status: 400)."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: sk-mock****. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: (
        "request_forbidden",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for {model} in organization org-mock on requests per min "
        "(RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    502: ("server_error", None, "Bad gateway."),
    503: (
        "server_error",
        None,
        "The engine is currently overloaded, please try again later",
    ),
}
# The gateway's own codes for a body that is not JSON at all; OpenAI answers those
# with `code: null`, and so does the mock.
_UNCODED = frozenset({"invalid_json", "invalid_encoding", "missing_body"})


class MockError(RequestError):
    """A refusal the mock answers: the gateway's RequestError plus OpenAI's `type`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message, code, param, status)  # type: ignore[arg-type]
        self.type = type_

    @classmethod
    def of(cls, err: RequestError) -> MockError:
        """The gateway parser's refusal as the provider would word its code."""
        code = None if err.code in _UNCODED else err.code
        return cls(err.status, err.message, param=err.param, code=code)

    def payload(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def parse(wire: type[WireFormat], body: bytes, path: str) -> Any:
    """`wire.parse_request`, the gateway's own validation, with its refusal as a
    MockError: the mock holds no copy of a format's request rules."""
    try:
        return wire.parse_request(body, path)
    except RequestError as e:
        raise MockError.of(e) from None


def error_payload(status: int, *, model: str = "gpt-3.5-turbo") -> dict[str, Any]:
    """OpenAI's error body for `status` (what `x-mock-status` answers)."""
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    type_, code, message = _ERRORS.get(
        status, (default_type, None, f"Mock error (x-mock-status: {status}).")
    )
    return MockError(status, message.format(model=model), code=code, type_=type_).payload()


def status_error(fmt: str, status: int, model: str) -> MockError:
    """What `x-mock-status` answers in format `fmt`."""
    if fmt == "openai":
        payload = error_payload(status, model=model)["error"]
        return MockError(status, payload["message"], code=payload["code"], type_=payload["type"])
    messages = {
        401: "invalid x-api-key" if fmt == "anthropic" else "The API key is not valid.",
        404: f"model: {model}",
        429: "Rate limit exceeded (x-mock-status: 429).",
        529: "Overloaded",
    }
    return MockError(status, messages.get(status, f"Mock error (x-mock-status: {status})."))


def openai_error(err: MockError) -> tuple[bytes, dict[str, str]]:
    """OpenAI's shape, `{"error": {...}}` (Chat, Responses, Azure)."""
    return orjson.dumps(err.payload()), {}
