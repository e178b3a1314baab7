"""The sidecar process: organs served over gRPC on Unix sockets."""
