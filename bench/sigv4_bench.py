"""What the cloud credentials cost per request, in process: the SigV4 signature over
the final request (botocore's signer: canonical request, SHA-256 of the body, the
HMAC chain) and the whole `credentials.finalize` step as the request-body phase runs
it, next to a background-refreshed Bearer token (a dictionary read).

    .venv/bin/python bench/sigv4_bench.py            # ~10 s
    .venv/bin/python bench/sigv4_bench.py --quick    # ~2 s

Reported: microseconds of CPU per request (this process's), the median of rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/sigv4_bench.py`
    sys.path.insert(0, str(REPO))

from botocore.credentials import ReadOnlyCredentials  # noqa: E402

from extproc.cloudauth import Fetched, sigv4  # noqa: E402
from extproc.config import load_config  # noqa: E402
from extproc.policy import RequestContext, Shared, build_policy  # noqa: E402
from extproc.policy.credentials import finalize  # noqa: E402
from extproc.providers import format_for  # noqa: E402

POLICY = """\
providers:
  bedrock:
    url: https://bedrock-runtime.us-east-1.amazonaws.com
    format: bedrock
    auth: {type: aws_sigv4, region: us-east-1, access_key_id_env: AK,
           secret_access_key_env: SK, session_token_env: ST}
  vertex:
    url: https://us-central1-aiplatform.googleapis.com
    format: vertex
    auth: {type: gcp, credentials_file: /nonexistent/key.json}
routes:
  - {name: bedrock, prefix: /bedrock/, provider: bedrock, rewrite: /}
  - {name: vertex, prefix: /vertex/, provider: vertex, rewrite: /}
"""
ENV = {"AK": "AKIDBENCH", "SK": "bench-secret-key", "ST": "bench-session-token"}
PATH = "/model/amazon.nova-lite-v1%3A0/converse-stream"


def body(size: int) -> bytes:
    text = ("lorem ipsum " * (size // 12 + 1))[: max(0, size - 60)]
    return b'{"messages":[{"role":"user","content":[{"text":"' + text.encode() + b'"}]}]}'


def per_call(fn, n: int, rounds: int) -> float:
    """Median CPU microseconds per call over `rounds` rounds of `n` calls."""
    samples = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(n):
            fn()
        samples.append((time.process_time() - start) / n * 1e6)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, rounds = (500, 3) if args.quick else (2000, 5)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(POLICY)
        config = load_config(str(path))
    policy = build_policy(config, Shared(), ENV)
    assert policy.cloud is not None
    vertex = policy.cloud.get("vertex")
    vertex.source.current = Fetched("ya29.bench-token", None)  # as the refresher leaves it

    def context(provider: str) -> RequestContext:
        route = config.route(provider)
        return RequestContext(
            route=route, provider=config.providers[provider],
            format=format_for(config.providers[provider].format), method="POST",
            path=f"/{provider}{PATH}", upstream_path=PATH, headers={},
        )  # fmt: skip

    credentials = ReadOnlyCredentials(ENV["AK"], ENV["SK"], ENV["ST"])
    print(f"SigV4 per request, CPU µs (median of {rounds} x {n}), {sys.version.split()[0]}")
    for size in (1_000, 32_000, 256_000):
        data = body(size)
        sign = per_call(
            lambda data=data: sigv4.sign(
                credentials, "us-east-1", "bedrock", "POST", "h", PATH, data
            ),
            n,
            rounds,
        )
        whole = per_call(
            lambda data=data: finalize(policy.cloud, context("bedrock"), data), n, rounds
        )
        print(f"  body {size:>7} B: sigv4.sign {sign:7.1f} µs   finalize (SigV4) {whole:7.1f} µs")
    bearer = per_call(lambda: finalize(policy.cloud, context("vertex"), b"{}"), n, rounds)
    empty = per_call(lambda: context("vertex"), n, rounds)
    print(f"  finalize (Bearer token) {bearer:.1f} µs, of which the context itself {empty:.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
