"""Benchmarks: the gateway through a real Envoy, against Envoy alone and a do-nothing
ext_proc server. Run with `.venv/bin/python bench/run.py [--quick]`; never part of pytest."""
