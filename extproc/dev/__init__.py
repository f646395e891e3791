"""The local stack `extproc run` and the tests start: the mock provider (`mock/`) and
`devstack` (mock + sidecar + a real Envoy).

Nothing here is imported by `extproc serve`: production never loads the mock, and the
mock's dependencies on test-only behaviour (knobs, recording) stay out of the runtime.
"""
