"""The error contract and the model base every section shares.

Pydantic checks types and constraints; this module turns its errors into the
contract operators rely on: one `(key, reason)` pair per problem, keys written as in
the file (`routes[1].provider`), reasons that say what was expected and what was got,
"did you mean" for unknown keys, and every problem of a file in one run.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from pydantic import ConfigDict, ValidationError, ValidationInfo, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs, PydanticCustomError

Loc = tuple[str | int, ...]
# Context key set by the loader: checks that only make sense for what a file says.
LOADING = "extproc.config"


class ConfigError(Exception):
    """One or more problems in a policy file; `problems` holds (key, reason) pairs."""

    def __init__(self, path: str, problems: list[tuple[str, str]]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        """One `FILE: key: reason` line per problem (`FILE: reason` for file-level ones)."""
        return [
            f"{self.path}: {key}: {reason}" if key else f"{self.path}: {reason}"
            for key, reason in self.problems
        ]


def describe(value: Any) -> str:
    """A value as the YAML author wrote it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null (empty)"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def unknown_key(name: Any, known: Iterable[str], what: str = "key") -> str:
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    if close:
        return f"unknown {what} '{name}' (did you mean '{close[0]}'?)"
    return f"unknown {what} '{name}' (known: {', '.join(known)})"


def key_of(loc: Loc) -> str:
    """('routes', 1, 'provider') -> 'routes[1].provider'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def fail(reason: str) -> PydanticCustomError:
    """The error a validator raises: `reason` is shown as is."""
    return PydanticCustomError("config", "{reason}", {"reason": reason})


def several(problems: list[tuple[Loc, str]]) -> PydanticCustomError:
    """Several problems below one value, keyed relative to it (flattened by `problems_of`)."""
    return PydanticCustomError("problems", "{n} problems", {"n": len(problems), "items": problems})


def _reason(error: Mapping[str, Any]) -> str:
    kind, got, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "config":
        return ctx["reason"]
    if kind == "int_type":
        return f"expected an integer, got {describe(got)}"
    if kind == "bool_type":
        return f"expected true or false, got {describe(got)}"
    if kind == "string_type":
        return f"expected a string, got {describe(got)}"
    if kind == "greater_than_equal":
        if ctx["ge"] == 1:
            return f"expected a positive integer, got {got}"
        return f"must be at least {ctx['ge']}, got {got}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}, got {got}"
    if kind in ("missing", "missing_argument"):
        return "required key is missing"
    if kind in ("dataclass_type", "dict_type", "model_type"):
        return f"expected a mapping, got {describe(got)}"
    if kind in ("tuple_type", "list_type"):
        return f"expected a list, got {describe(got)}"
    return str(error["msg"])


def problems_of(exc: ValidationError) -> list[tuple[Loc, str]]:
    """Pydantic's errors as (location, reason), with `several` expanded in place."""
    out: list[tuple[Loc, str]] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "problems":
            out += [(loc + tuple(sub), reason) for sub, reason in error["ctx"]["items"]]
        else:
            out.append((loc, _reason(error)))
    return out


@dataclass(frozen=True, slots=True)
class Section:
    """Base of every config model: frozen, unknown keys refused.

    When the loader validates a file, a mapping is checked the way operators expect:
    unknown keys named with a close match, and `checks` (between keys, on what
    the file says) reported together with the fields' own problems.
    """

    # Fields the file never writes (the name of a mapping entry is its key).
    derived: ClassVar[tuple[str, ...]] = ()
    # `server:` with nothing under it means all defaults.
    empty_ok: ClassVar[bool] = False
    # Keys a file must write although code may leave them out (`limits`, `rules`).
    required: ClassVar[tuple[str, ...]] = ()
    missing: ClassVar[str] = "required key is missing"

    @classmethod
    def prepare(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Defaults that depend on what else the file says (before validation)."""
        return raw

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        """Problems between keys of one mapping as written (relative locations);
        `refused` holds the keys whose own values were already refused."""
        return []


def _as_written(model: type[Section], data: Any, handler: Any, info: ValidationInfo) -> Any:
    """Validate a mapping as the file wrote it (see `Section`); code gets plain pydantic."""
    if not (info.context and info.context.get(LOADING)) or isinstance(data, ArgsKwargs | model):
        return handler(data)
    if data is None and model.empty_ok:
        data = {}
    if not isinstance(data, dict):
        raise fail(f"expected a mapping, got {describe(data)}")
    fields = list(model.__pydantic_fields__)
    known = [name for name in fields if name not in model.derived]
    order = {name: index for index, name in enumerate(data)}
    found = [((name,), unknown_key(name, known)) for name in data if name not in fields]
    result = None
    try:
        result = handler(model.prepare({k: v for k, v in data.items() if k in fields}))
    except ValidationError as exc:
        found += problems_of(exc)
    found += [((key,), model.missing) for key in model.required if key not in data]
    found += model.checks(data, {loc[0] for loc, _ in found if loc})
    if found:  # in the order the file has them, missing keys last
        found.sort(key=lambda item: order.get(item[0][0], len(order)) if item[0] else -1)
        raise several(found)
    return result


def _as_file_schema(schema: dict[str, Any], cls: type) -> None:
    """The schema of what a file writes: no derived keys, the file's required keys."""
    properties = schema.get("properties", {})
    for name in getattr(cls, "derived", ()):
        properties.pop(name, None)
    required = [k for k in schema.get("required", ()) if k in properties]
    required += [k for k in getattr(cls, "required", ()) if k not in required]
    if required:
        schema["required"] = required
    else:
        schema.pop("required", None)


CONFIG = ConfigDict(
    extra="forbid",
    use_attribute_docstrings=True,
    revalidate_instances="never",
    json_schema_extra=_as_file_schema,
)


def section(cls: type) -> Any:
    """Declare a config model: a frozen, slotted pydantic dataclass that validates a
    file's mapping as `Section` says."""
    model: Any = None

    def validate(_: type, data: Any, handler: Any, info: ValidationInfo) -> Any:
        return _as_written(model, data, handler, info)

    cls._as_written = model_validator(mode="wrap")(classmethod(validate))  # type: ignore[attr-defined]
    model = dataclass(frozen=True, slots=True, kw_only=True, config=CONFIG)(cls)
    return model
