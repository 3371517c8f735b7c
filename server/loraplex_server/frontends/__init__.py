"""The protocols, each a codec over api/ (decode, call the request path, encode): our gRPC (inference, admin),
the OpenAI-compatible HTTP API, KServe OIP, and the Ray Serve replica (gRPC and HTTP through Ray's proxies)."""
