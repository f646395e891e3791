"""Code generated from protos/ by grpcio-tools (`make protos`); do not edit."""
