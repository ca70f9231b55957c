"""Generated protobuf and gRPC stubs of layerd.v1 (see scripts/generate.py)."""
