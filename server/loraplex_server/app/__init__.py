"""The `serve` command (options, ports checked before heavy imports), the single-node server, `serve --ray`,
and build_runtime: the engine, store, cache and loop, built alike for `serve` and every Ray replica."""
