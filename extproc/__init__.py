"""Envoy ext_proc sidecar: auth, policy and SSE-aware metering for LLM traffic."""
