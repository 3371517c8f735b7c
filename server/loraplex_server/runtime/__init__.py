"""The loop that owns the engine on one thread, and the adapter residency it drives."""
