"""Generated gRPC API code (see protos/); regenerate with `make protos`."""
