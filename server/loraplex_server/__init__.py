"""loraplex server: frozen base model, batched multi-adapter LoRA engine, gRPC service."""
