"""Live policy reload: notice a changed policy (or key) file, validate it, report it.

A ConfigMap or Secret update swaps the `..data` symlink of the mounted volume to a new
directory in one step, and the new file's mtime may be older than the old one's, so
the watcher compares content, polling once a second (no inotify dependency; reading a
few small files a second costs nothing, and polling also sees a file on NFS or a
volume that inotify misses). Plain blocking code: the single worker runs it in a
thread, the supervisor in its loop; neither imports grpc here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass

from extproc.config import Config, ConfigError, load_config
from extproc.metrics import Metrics

log = logging.getLogger("extproc.reload")
POLL_INTERVAL_S = 1.0
# Set by the supervisor for its workers: the last policy it validated. Workers load
# this snapshot, so a worker restarted while the mounted file is broken still starts
# with the policy its siblings run.
SNAPSHOT_ENV = "EXTPROC_POLICY_SNAPSHOT"


@dataclass(frozen=True, slots=True)
class Reload:
    """A change seen by `PolicyWatcher`: a valid new config, or why it was refused."""

    config: Config | None
    error: ConfigError | None
    data: bytes | None  # the policy bytes that were validated


def read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


# Settings naming a file the sidecar reads when the policy loads (provider and
# consumer keys, JWKS, secrets): `*_file` or `file`. Envoy's own files are not ours.
_NOT_OURS = frozenset({"access_log", "ca_file"})


def referenced_files(config: Config) -> list[str]:
    """Every file the policy names for the sidecar to read, in a stable order."""
    found: set[str] = set()

    def walk(value: object) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for item in dataclasses.fields(value):
                child = getattr(value, item.name)
                named_file = item.name == "file" or item.name.endswith("_file")
                if named_file and item.name not in _NOT_OURS and isinstance(child, str):
                    found.add(child)
                else:
                    walk(child)
        elif isinstance(value, dict):
            for child in value.values():
                walk(child)
        elif isinstance(value, list | tuple):
            for child in value:
                walk(child)

    walk(config)
    return sorted(found)


class PolicyWatcher:
    """Notices a changed policy file or provider key file and validates the new policy.

    Plain blocking code (small files, once a second): the single worker runs it in a
    thread, the supervisor in its loop. Content is compared, not mtimes: a ConfigMap
    or Secret update swaps the `..data` symlink to a new directory at once. Key files
    (`api_key_file`, mounted Secrets) count as part of the policy, so a rotated key is
    picked up without touching the policy file; so do consumer key files, JWKS and
    every other file the policy names (`referenced_files`).
    """

    def __init__(self, path: str, config: Config, data: bytes | None = None) -> None:
        self.path = path
        self.config = config
        self._seen = self._fingerprint(read_file(path) if data is None else data, config)

    @staticmethod
    def _fingerprint(data: bytes | None, config: Config) -> bytes:
        digest = hashlib.sha256(b"\0missing" if data is None else data)
        for path in referenced_files(config):
            content = read_file(path)
            digest.update(b"\0file\0" + path.encode() + b"\0")
            digest.update(b"\0missing" if content is None else hashlib.sha256(content).digest())
        return digest.digest()

    def check(self) -> Reload | None:
        """None when nothing changed since the last call; else the validated outcome.

        A refused change is reported once; the same content is not reported again.
        """
        data = read_file(self.path)
        fingerprint = self._fingerprint(data, self.config)
        if fingerprint == self._seen:
            return None
        self._seen = fingerprint
        try:
            config = load_config(self.path, data)
        except ConfigError as exc:
            return Reload(None, exc, data)
        self.config = config
        self._seen = self._fingerprint(data, config)  # the new policy's key files
        return Reload(config, None, data)


def restart_needed(old: Config, new: Config) -> list[tuple[str, str]]:
    """Settings of `new` that a running sidecar cannot apply: (key, what to do)."""
    out: list[tuple[str, str]] = []
    for name in ("grpc_listen", "metrics_listen", "workers"):
        if getattr(old.server, name) != getattr(new.server, name):
            out.append((f"server.{name}", "takes effect when the sidecar restarts"))
    envoy_side = "Envoy routes by its own bootstrap (or HTTPRoutes): render and apply it again"
    if old.envoy != new.envoy:
        out.append(("envoy", envoy_side))
    if _envoy_routes(old) != _envoy_routes(new):
        out.append(("routes", envoy_side))
    for name, provider in new.providers.items():
        before = old.providers.get(name)
        if before is None or (before.url, before.ca_file) != (provider.url, provider.ca_file):
            out.append((f"providers.{name}", envoy_side))
    return out


def report_reload(reload: Reload, previous: Config, metrics: Metrics) -> None:
    """Log and count one reload outcome (once per change, by whoever watches the file)."""
    if reload.error is not None:
        metrics.config_reloads.labels("failure").inc()
        for line in reload.error.lines():
            log.error("config reload refused, keeping the previous policy: %s", line)
        return
    assert reload.config is not None
    metrics.config_reloads.labels("success").inc()
    log.info("config reloaded from %s", reload.config.path)
    for key, what in restart_needed(previous, reload.config):
        log.warning("config reload: %s changed: %s", key, what)


def _envoy_routes(config: Config) -> list[tuple[str, str, str, str | None]]:
    """What of the routes Envoy's bootstrap holds (auth and model lists are the
    sidecar's own and apply live)."""
    return [(r.name, r.prefix, r.provider, r.rewrite) for r in config.routes]
