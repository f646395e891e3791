"""Benchmarks: the gateway through a real Envoy, against Envoy alone and a do-nothing
ext_proc server. Run with `.venv/bin/python bench/run.py [--quick]`; no benchmark runs
under pytest (tests/test_bench.py checks only the pure parts: schema, targets, grouping)."""
