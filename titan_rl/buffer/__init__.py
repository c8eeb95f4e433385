"""Buffer service: thread-safe experience replay behind gRPC."""
