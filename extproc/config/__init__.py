"""Policy YAML -> frozen pydantic models, each field declared once.

`loader` keeps the error contract (file, key path, reason, "did you mean"); one module
per section: `server` (sidecar, Envoy, streaming), `routing` (providers, routes),
`access` (consumers, auth, models), `limits`, `guards`; `document` is the whole file,
`refs` the checks across entries.
"""

from extproc.config.access import (
    DEFAULT_JWT_ALGORITHMS,
    JWT_ALGORITHMS,
    AliasConfig,
    ApiKeyConfig,
    AuthConfig,
    ConsumerConfig,
    JwtConfig,
    ModelsConfig,
)
from extproc.config.base import ConfigError
from extproc.config.document import WORKER_CHECKS, Config, check_workers
from extproc.config.guards import (
    GuardConfig,
    GuardPatternConfig,
    GuardRejectConfig,
    GuardsConfig,
    GuardWebhookConfig,
)
from extproc.config.limits import LimitConfig, LimitMatch, RateLimitsConfig, RedisConfig
from extproc.config.loader import load_config, parse_config, schema
from extproc.config.routing import WIRE_FORMATS, ProviderConfig, RouteConfig
from extproc.config.server import MAX_WORKERS, EnvoyConfig, ServerConfig, StreamingConfig

__all__ = [
    "DEFAULT_JWT_ALGORITHMS",
    "JWT_ALGORITHMS",
    "MAX_WORKERS",
    "WIRE_FORMATS",
    "WORKER_CHECKS",
    "AliasConfig",
    "ApiKeyConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "ConsumerConfig",
    "EnvoyConfig",
    "GuardConfig",
    "GuardPatternConfig",
    "GuardRejectConfig",
    "GuardWebhookConfig",
    "GuardsConfig",
    "JwtConfig",
    "LimitConfig",
    "LimitMatch",
    "ModelsConfig",
    "ProviderConfig",
    "RateLimitsConfig",
    "RedisConfig",
    "RouteConfig",
    "ServerConfig",
    "StreamingConfig",
    "check_workers",
    "load_config",
    "parse_config",
    "schema",
]
