"""Policy file loading: the shipped files load, and every mistake an operator can make
is reported with the file, the dotted key and a reason they can act on."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from extproc.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """\
providers:
  mock: {url: "http://127.0.0.1:9000", format: openai}
  openai: {url: "https://api.openai.com", format: openai, api_key_env: OPENAI_API_KEY}
routes:
  - {name: openai, prefix: /openai, provider: mock, rewrite: /v1/chat/completions}
  - {name: v1, prefix: /v1/, provider: mock}
"""


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems_of(tmp_path: Path, text: str) -> tuple[str, list[tuple[str, str]]]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == path
    return path, info.value.problems


def test_dev_yaml_loads() -> None:
    config = load_config(str(REPO / "config" / "dev.yaml"))
    assert [(r.name, r.prefix, r.provider, r.rewrite) for r in config.routes][:2] == [
        ("openai", "/openai", "mock", "/v1/chat/completions"),
        ("v1", "/v1/", "mock", None),
    ]
    # One demo route per other wire format, all served by the one mock process.
    assert {
        r.name: (r.prefix, config.providers[r.provider].format, config.providers[r.provider].url)
        for r in config.routes[2:]
    } == {
        name: (f"/{name}/", name, "http://127.0.0.1:9000")
        for name in ("anthropic", "gemini", "vertex", "bedrock", "azure")
    }
    mock = config.providers["mock"]
    assert (mock.url, mock.format, mock.tls) == ("http://127.0.0.1:9000", "openai", False)
    assert config.envoy.listen == "127.0.0.1:8080"
    assert config.envoy.failure_mode_allow is False
    assert config.server.grpc_listen == "127.0.0.1:50051"


def test_openai_yaml_routes_to_real_openai_over_tls() -> None:
    config = load_config(str(REPO / "config" / "openai.yaml"))
    assert {r.provider for r in config.routes} == {"openai"}
    openai = config.providers["openai"]
    assert (openai.tls, openai.host, openai.port) == (True, "api.openai.com", 443)
    assert openai.api_key_env == "OPENAI_API_KEY"


def test_sections_other_than_providers_and_routes_are_optional(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.envoy.message_timeout_ms == 2000
    assert config.streaming.ensure_usage is True
    assert config.route("v1") is not None


def test_streaming_on_block(tmp_path: Path) -> None:
    """`drain` (today's behaviour) unless the policy asks to close the provider's stream."""
    assert load_config(write(tmp_path, MINIMAL)).streaming.on_block == "drain"
    for mode in ("drain", "close"):
        text = MINIMAL + f"streaming: {{on_block: {mode}}}\n"
        assert load_config(write(tmp_path, text)).streaming.on_block == mode


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path, problems = problems_of(
        tmp_path,
        """\
        server: {log_level: loud}
        envoy: {message_timeout_ms: abc}
        providers:
          mock: {url: "http://127.0.0.1:9000"}
        routes:
          - {name: a, prefix: /a, provider: nope}
        """,
    )
    keys = [key for key, _ in problems]
    assert keys == ["server.log_level", "envoy.message_timeout_ms", "routes[0].provider"]
    # The error text is one `FILE: key: reason` line per problem.
    lines = str(ConfigError(path, problems)).splitlines()
    assert lines[1] == f"{path}: envoy.message_timeout_ms: expected an integer, got 'abc'"


BAD_CASES = [
    # (YAML to splice into MINIMAL's place, key, reason fragment)
    pytest.param(
        "envoy: {message_timeout_ms: abc}",
        "envoy.message_timeout_ms",
        "expected an integer, got 'abc'",
        id="not-an-int",
    ),
    pytest.param(
        "envoy: {max_request_bytes: true}",
        "envoy.max_request_bytes",
        "expected an integer, got true",
        id="bool-is-not-an-int",
    ),
    pytest.param(
        "envoy: {max_request_bytes: 0}",
        "envoy.max_request_bytes",
        "expected a positive integer, got 0",
        id="zero",
    ),
    pytest.param(
        "envoy: {max_request_bytes: 5000000000}",
        "envoy.max_request_bytes",
        "must be at most 4294967295",
        id="above-uint32",
    ),
    pytest.param(
        "streaming: {max_frame_bytes: -5}",
        "streaming.max_frame_bytes",
        "expected a positive integer, got -5",
        id="negative",
    ),
    pytest.param(
        "streaming: {on_block: stop}",
        "streaming.on_block",
        "unknown on_block mode 'stop' (known: drain, close)",
        id="on-block-mode",
    ),
    pytest.param(
        "streaming: {on_block: true}",
        "streaming.on_block",
        "expected a string, got true",
        id="on-block-not-a-string",
    ),
    pytest.param(
        "envoy: {failure_mode_allow: 'no'}",
        "envoy.failure_mode_allow",
        "expected true or false, got 'no'",
        id="not-a-bool",
    ),
    pytest.param(
        "envoy: {mesage_timeout_ms: 5}",
        "envoy.mesage_timeout_ms",
        "unknown key 'mesage_timeout_ms' (did you mean 'message_timeout_ms'?)",
        id="typo-did-you-mean",
    ),
    pytest.param(
        "envoy: {colour: blue}",
        "envoy.colour",
        "unknown key 'colour' (known: listen, admin,",
        id="unknown-key-lists-known",
    ),
    pytest.param(
        "rutes: []",
        "rutes",
        "unknown key 'rutes' (did you mean 'routes'?)",
        id="unknown-top-level",
    ),
    pytest.param(
        "envoy: {listen: 'localhost:8080'}",
        "envoy.listen",
        "host must be an IP address, got 'localhost'",
        id="listen-hostname",
    ),
    pytest.param(
        "envoy: {admin: '127.0.0.1'}",
        "envoy.admin",
        "expected host:port",
        id="listen-no-port",
    ),
    pytest.param(
        "envoy: {listen: '127.0.0.1:70000'}",
        "envoy.listen",
        "port must be 1-65535, got '70000'",
        id="listen-port-range",
    ),
    pytest.param(
        "envoy: {listen: '::1:8080'}",
        "envoy.listen",
        "write an IPv6 address in brackets",
        id="ipv6-without-brackets",
    ),
    pytest.param(
        "server: {grpc_listen: 'unix:sock'}",
        "server.grpc_listen",
        "unix socket path must be absolute",
        id="unix-relative",
    ),
    pytest.param(
        "server: {grpc_listen: 'unix:/" + "x" * 120 + "'}",
        "server.grpc_listen",
        "longer than 107 bytes",
        id="unix-too-long",
    ),
    pytest.param(
        "server: {log_level: loud}",
        "server.log_level",
        "unknown log level 'loud' (known: debug, info, warning, error, critical)",
        id="log-level",
    ),
    pytest.param(
        "envoy: {access_log: access.log}",
        "envoy.access_log",
        "expected an absolute file path",
        id="relative-access-log",
    ),
    pytest.param(
        "server: [1, 2]",
        "server",
        "expected a mapping, got a list",
        id="section-not-a-mapping",
    ),
]


@pytest.mark.parametrize(("extra", "key", "reason"), BAD_CASES)
def test_bad_setting_names_key_and_reason(
    tmp_path: Path, extra: str, key: str, reason: str
) -> None:
    _, problems = problems_of(tmp_path, MINIMAL + extra + "\n")
    assert len(problems) == 1, problems
    (got_key, got_reason) = problems[0]
    assert got_key == key
    assert reason in got_reason


PROVIDER_CASES = [
    pytest.param(
        "{url: 'ftp://example.com'}",
        "providers.x.url",
        "expected an http:// or https:// URL, got 'ftp://example.com'",
        id="scheme",
    ),
    pytest.param("{url: 'http://'}", "providers.x.url", "URL has no host", id="no-host"),
    pytest.param(
        "{url: 'https://api.openai.com/v1'}",
        "providers.x.url",
        "expected scheme://host[:port] only",
        id="path",
    ),
    pytest.param("{url: 'http://h:99999'}", "providers.x.url", "invalid port", id="port"),
    pytest.param(
        "{url: 'https://u:p@h'}", "providers.x.url", "credentials do not belong", id="creds"
    ),
    pytest.param(
        "{url: 'http://h', format: cohere}",
        "providers.x.format",
        "unknown format 'cohere' (known: openai, azure, anthropic, gemini, vertex, bedrock)",
        id="format",
    ),
    pytest.param("{format: openai}", "providers.x.url", "required key is missing", id="no-url"),
    pytest.param(
        "{url: 'http://h', api_key_env: K, api_key_file: /k}",
        "providers.x",
        "set api_key_env or api_key_file, not both",
        id="two-key-sources",
    ),
    pytest.param(
        "{url: 'http://h', api_key_env: 'MY-KEY'}",
        "providers.x.api_key_env",
        "expected an environment variable name",
        id="env-name",
    ),
    pytest.param(
        "{url: 'http://h', ca_file: /ca.pem}",
        "providers.x.ca_file",
        "only meaningful for an https:// url",
        id="ca-file-on-http",
    ),
]


@pytest.mark.parametrize(("settings", "key", "reason"), PROVIDER_CASES)
def test_bad_provider(tmp_path: Path, settings: str, key: str, reason: str) -> None:
    _, problems = problems_of(
        tmp_path,
        f"""\
        providers:
          x: {settings}
        routes:
          - {{name: r, prefix: /r, provider: x}}
        """,
    )
    assert [(k, r) for k, r in problems if k == key and reason in r], problems


def test_unknown_provider_lists_the_known_ones(tmp_path: Path) -> None:
    text = MINIMAL.replace("/v1/, provider: mock", "/v1/, provider: foo")
    _, problems = problems_of(tmp_path, text)
    assert problems == [("routes[1].provider", "unknown provider 'foo' (known: mock, openai)")]


def test_route_problems(tmp_path: Path) -> None:
    _, problems = problems_of(
        tmp_path,
        """\
        providers:
          mock: {url: "http://127.0.0.1:9000"}
        routes:
          - {name: a, prefix: /a, provider: mock}
          - {name: a, prefix: /b, provider: mock}
          - {name: c, prefix: c, provider: mock}
          - {name: d, prefix: /d, provider: mock, rewrite: v1}
          - {prefix: /e}
          - just-a-string
          - {name: 'bad name', prefix: /f, provider: mock}
        """,
    )
    got = dict(problems)
    assert got["routes[1].name"] == "duplicate route name 'a' (also routes[0])"
    assert got["routes[2].prefix"] == "must start with '/', got 'c'"
    assert got["routes[3].rewrite"] == "must start with '/', got 'v1'"
    assert got["routes[4].name"] == "required key is missing"
    assert got["routes[4].provider"] == "required key is missing"
    assert got["routes[5]"] == "expected a mapping, got 'just-a-string'"
    assert got["routes[6].name"].startswith("expected a name of letters, digits")


def test_shadowed_route_is_reported(tmp_path: Path) -> None:
    _, problems = problems_of(
        tmp_path,
        """\
        providers:
          mock: {url: "http://127.0.0.1:9000"}
        routes:
          - {name: v1, prefix: /v1/, provider: mock}
          - {name: chat, prefix: /v1/chat, provider: mock}
          - {name: openai, prefix: /openai, provider: mock}
          - {name: openaix, prefix: /openaix, provider: mock}
        """,
    )
    # /openai does not cover /openaix: it matches /openai and /openai/..., not /openaix.
    assert len(problems) == 1
    key, reason = problems[0]
    assert key == "routes[1].prefix"
    assert "unreachable: routes[0] ('v1', prefix '/v1/')" in reason


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        pytest.param("providers: {}\nroutes: []\n", "routes", "expected at least one route"),
        pytest.param(MINIMAL.split("routes:")[0], "routes", "required section is missing"),
        pytest.param(
            "routes:\n  - {name: a, prefix: /a, provider: m}\n",
            "providers",
            "required section is missing",
        ),
        pytest.param(
            "providers: {}\nroutes: [{name: a, prefix: /a, provider: m}]\n",
            "providers",
            "expected at least one provider",
        ),
    ],
)
def test_required_sections(tmp_path: Path, text: str, key: str, reason: str) -> None:
    _, problems = problems_of(tmp_path, text)
    assert (key, reason) in problems
    # A missing or empty providers section is not repeated as "unknown provider" per route.
    assert not any(k.endswith(".provider") for k, _ in problems)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    _, problems = problems_of(tmp_path, "providers:\n  mock: {url: x\nroutes: []\n")
    ((key, reason),) = problems
    assert key.startswith("line 3, column ")
    assert reason.startswith("invalid YAML:")


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    # PyYAML alone keeps the last `routes:` silently.
    _, problems = problems_of(tmp_path, MINIMAL + "routes: []\n")
    ((key, reason),) = problems
    assert key == "line 7, column 1"
    assert "duplicate key 'routes' (first on line 4)" in reason


def test_yaml_merge_keys_may_override(tmp_path: Path) -> None:
    # An anchor merged then overridden is not a duplicate key.
    text = """\
        providers:
          a: &base {url: "http://127.0.0.1:9000", format: openai}
          b: {<<: *base, url: "http://127.0.0.1:9001"}
        routes:
          - {name: r, prefix: /r, provider: b}
        """
    config = load_config(write(tmp_path, text))
    assert config.providers["b"].url == "http://127.0.0.1:9001"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("", "file is empty", id="empty"),
        pytest.param("- a\n- b\n", "expected a mapping at the top level", id="list"),
        pytest.param("just text\n", "expected a mapping at the top level", id="scalar"),
    ],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, reason: str) -> None:
    path, problems = problems_of(tmp_path, text)
    ((key, got),) = problems
    assert key == ""
    assert reason in got
    assert str(ConfigError(path, problems)).startswith(f"{path}: {reason}")


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert "is a directory" in str(info.value)


def test_accepted_addresses() -> None:
    config = parse_config(
        {
            "server": {"grpc_listen": "unix:/run/extproc.sock", "metrics_listen": "[::1]:9464"},
            "envoy": {"listen": "0.0.0.0:8080", "admin": "[::1]:9901"},
            "providers": {"p": {"url": "http://[::1]:9000"}},
            "routes": [{"name": "r", "prefix": "/", "provider": "p"}],
        }
    )
    assert config.server.grpc_listen == "unix:/run/extproc.sock"
    assert config.providers["p"].host == "::1"


# ------------------------------------------------------------------ the CLI, as a user runs it


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", ["config/dev.yaml", "config/openai.yaml"])
def test_check_config_ok(name: str) -> None:
    result = run_cli("check-config", name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{name}: OK\n"
    assert result.stderr == ""


def test_check_config_reports_each_problem_on_stderr(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL.replace("/v1/, provider: mock", "/v1/, provider: foo")
        + "envoy: {message_timeout_ms: abc}\n",
    )
    result = run_cli("check-config", path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}: envoy.message_timeout_ms: expected an integer, got 'abc'",
        f"{path}: routes[1].provider: unknown provider 'foo' (known: mock, openai)",
    ]


def test_check_config_missing_file(tmp_path: Path) -> None:
    result = run_cli("check-config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    assert result.stderr == f"{tmp_path / 'missing.yaml'}: file not found\n"


def test_envoy_config_prints_and_writes_the_bootstrap(tmp_path: Path) -> None:
    printed = run_cli("envoy-config", "config/dev.yaml")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith("# Envoy bootstrap generated by `extproc envoy-config")
    out = tmp_path / "envoy.yaml"
    written = run_cli("envoy-config", "config/dev.yaml", "-o", str(out))
    assert written.returncode == 0, written.stderr
    assert out.read_text() == printed.stdout


def test_envoy_config_with_bad_policy_fails(tmp_path: Path) -> None:
    result = run_cli("envoy-config", write(tmp_path, "routes: 3\n"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "routes: expected a list of routes, got 3" in result.stderr


def test_translation_targets_are_checked_per_format() -> None:
    """`project`/`location` are Vertex's and go together; `api_version` is Azure's."""
    base = {"routes": [{"name": "r", "prefix": "/r", "provider": "v"}]}
    with pytest.raises(ConfigError) as info:
        parse_config(
            {**base, "providers": {"v": {"url": "http://h", "format": "vertex", "project": "p"},
                                   "o": {"url": "http://h", "api_version": "2024-10-21"}}},
            "p.yaml",
        )  # fmt: skip
    assert info.value.problems == [
        ("providers.v", "set project and location together"),
        ("providers.o.api_version", "only meaningful for format: azure"),
    ]
    config = parse_config(
        {**base, "providers": {"v": {"url": "http://h", "format": "vertex", "project": "p",
                                     "location": "global"}}},
        "p.yaml",
    )  # fmt: skip
    assert (config.providers["v"].project, config.providers["v"].location) == ("p", "global")
