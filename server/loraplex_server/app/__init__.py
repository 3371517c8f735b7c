"""The `serve` command, its options, and what builds a runtime from them."""
