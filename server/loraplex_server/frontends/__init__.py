"""The protocols: our gRPC (inference, admin), the OpenAI-compatible HTTP API, KServe OIP, Ray Serve."""
