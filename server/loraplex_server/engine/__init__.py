"""The engine: step loop, planner, paged KV cache, model runner, sampling, detokenizing."""
