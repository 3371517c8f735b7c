"""Codecs of the protocols: our gRPC, OpenAI HTTP, KServe OIP, Ray Serve."""
