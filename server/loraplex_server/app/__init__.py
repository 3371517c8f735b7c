"""The `serve` command, its options, and `serve --ray`."""
