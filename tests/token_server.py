"""A local OAuth token endpoint for the cloud-credential tests (the network is closed).

Google: `POST /google/<name>/token` takes a service account's JWT-bearer assertion,
checks its RS256 signature with the key the test generated, and answers the next
planned token. Entra ID: `GET /<tenant>/v2.0/.well-known/openid-configuration` and
`POST /<tenant>/oauth2/v2.0/token` (client credentials, the secret checked), over
HTTPS with a certificate made in the test (MSAL insists on https). Every call is
recorded; `failing` makes an endpoint answer 500 until the test clears it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

# google-auth signs every service-account assertion for Google's endpoint, whatever
# the key file's token_uri.
GOOGLE_AUDIENCE = "https://oauth2.googleapis.com/token"


def self_signed(directory: Path, name: str = "token") -> tuple[Path, Path]:
    """A CA-style self-signed certificate for 127.0.0.1, made now."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token endpoint test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def service_account_key(path: Path, token_uri: str) -> rsa.RSAPrivateKey:
    """Write a service-account key file whose `token_uri` is the local endpoint."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "gateway-test",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "gateway@gateway-test.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info))
    return key


class TokenServer:
    """Planned tokens per endpoint name: `plan[name]` yields (token, expires_in)."""

    def __init__(self, directory: Path, *, tls: bool = False) -> None:
        self.calls: dict[str, int] = {}
        self.served: dict[str, list[str]] = {}
        self.failing: set[str] = set()
        self.plans: dict[str, Iterator[tuple[str, int]]] = {}
        self.public_keys: dict[str, Any] = {}  # Google endpoint -> the key it checks
        self.secrets: dict[str, str] = {}  # Entra tenant -> the client secret it accepts
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = self.path.split("/")
                if self.path.endswith("/v2.0/.well-known/openid-configuration"):
                    tenant = parts[1]
                    base = server.url
                    self._json(200, {
                        "token_endpoint": f"{base}/{tenant}/oauth2/v2.0/token",
                        "authorization_endpoint": f"{base}/{tenant}/oauth2/v2.0/authorize",
                        "issuer": f"{base}/{tenant}/v2.0",
                        "device_authorization_endpoint": f"{base}/{tenant}/oauth2/v2.0/devicecode",
                    })  # fmt: skip
                    return
                self._json(404, {"error": "not_found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                parts = self.path.split("/")
                if self.path.startswith("/google/") and self.path.endswith("/token"):
                    name = parts[2]
                    self._answer(name, lambda: server._check_google(name, form))
                elif self.path.endswith("/oauth2/v2.0/token"):
                    tenant = parts[1]
                    self._answer(tenant, lambda: server._check_entra(tenant, form))
                else:
                    self._json(404, {"error": "not_found"})

            def _answer(self, name: str, check: Any) -> None:
                with server.lock:
                    server.calls[name] = server.calls.get(name, 0) + 1
                    if name in server.failing:
                        self._json(500, {"error": "internal_failure"})
                        return
                    problem = check()
                    if problem:
                        self._json(400, {"error": "invalid_grant", "error_description": problem})
                        return
                    token, expires_in = next(server.plans[name])
                    server.served.setdefault(name, []).append(token)
                self._json(200, {"access_token": token, "expires_in": expires_in,
                                 "token_type": "Bearer"})  # fmt: skip

            def _json(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        self.ca: Path | None = None
        if tls:
            self.ca, key = self_signed(directory)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.ca, key)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    # -- endpoints the test sets up -----------------------------------------------

    def google(self, directory: Path, name: str, tokens: list[tuple[str, int]]) -> Path:
        """A service-account key file for endpoint `name`, serving `tokens` in turn
        (the last one again and again)."""
        path = directory / f"{name}-sa.json"
        key = service_account_key(path, f"{self.url}/google/{name}/token")
        self.public_keys[name] = key.public_key()
        self.plans[name] = _then_repeat(tokens)
        return path

    def entra(self, tenant: str, secret: str, tokens: list[tuple[str, int]]) -> None:
        self.secrets[tenant] = secret
        self.plans[tenant] = _then_repeat(tokens)

    def _check_google(self, name: str, form: dict[str, str]) -> str:
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return "unsupported grant_type"
        try:
            claims = jwt.decode(
                form.get("assertion", ""),
                self.public_keys[name],
                algorithms=["RS256"],
                audience=GOOGLE_AUDIENCE,
            )
        except jwt.PyJWTError as exc:
            return f"Invalid JWT: {exc}"
        if "cloud-platform" not in claims.get("scope", ""):
            return "scope cloud-platform missing"
        return ""

    def _check_entra(self, tenant: str, form: dict[str, str]) -> str:
        if form.get("grant_type") != "client_credentials":
            return "unsupported grant_type"
        if form.get("client_secret") != self.secrets[tenant]:
            return "AADSTS7000215: Invalid client secret provided."
        if form.get("scope") != "https://cognitiveservices.azure.com/.default":
            return f"unexpected scope {form.get('scope')!r}"
        return ""

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _then_repeat(tokens: list[tuple[str, int]]) -> Iterator[tuple[str, int]]:
    yield from tokens
    while True:
        yield tokens[-1]
