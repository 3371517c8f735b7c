"""n > 1: several choices of one prompt that share its prefill.

A request with n choices runs as one row until its prompt is computed. At the step that samples its
first token, it forks: choices 1..n-1 become rows of their own that start from the same KV blocks
(kv_cache.PagedKVCache.fork: the prompt's full blocks shared and refcounted, a partly filled last block
copied, as vLLM's copy-on-write does) and draw their first token from the same logits. So the prompt
is prefilled once, whatever n is.

Seeds: choice i samples with seed + i (wrapping in int64), where seed is the request's seed or, without
one, the random seed drawn for it. So a request with seed s and n choices gives, as choice i, what a
request with seed s + i and n = 1 gives. Greedy decoding (temperature 0) ignores seeds: its n choices
are n copies of the same text, as in vLLM.

If no KV block is free for a choice's copy of the last block, that choice waits at the front of the
queue and recomputes its prompt's tail later (its full blocks are then found in the prefix cache);
sampling is counter-based, so its tokens are the same either way.
"""

from __future__ import annotations

from loraplex_server.engine.kv_cache import PagedKVCache
from loraplex_server.engine.planner import StepPlanner
from loraplex_server.engine.sampling import INT64_MAX, INT64_MIN
from loraplex_server.engine.sequence import Sequence


def _choice_seed(seed: int, index: int) -> int:
    return (seed + index - INT64_MIN) % (INT64_MAX - INT64_MIN + 1) + INT64_MIN


def forks_now(seq: Sequence) -> bool:
    """The first choice of a request with n > 1, about to sample its first token: fork before sampling."""
    return seq.params.n > 1 and seq.parent is None and not seq.output_ids and seq.open_choices == 1


def fork(seq: Sequence, planner: StepPlanner) -> list[Sequence]:
    """Choices 1..n-1 of `seq`'s request, which has just computed its prompt: running rows that share its
    prompt's KV blocks, or (no block free for the copy) waiting rows that recompute its tail."""
    kv, prompt = planner.kv, seq.num_tokens
    children = []
    for index in range(1, seq.params.n):
        child = Sequence(seq.request, seq.slot, seq.eos_ids, seq.max_total_tokens, seq.identity)
        child.index, child.parent = index, seq
        child.seed = _choice_seed(seq.seed, index)
        blocks = kv.fork(seq.blocks, prompt)
        if blocks is None:
            planner.waiting.appendleft(child)
        else:
            child.blocks, child.num_cached = blocks, seq.num_cached
            child.block_keys = list(seq.block_keys)
            child.registered = min(seq.registered, prompt // kv.block_size)
            planner.running.append(child)
        children.append(child)
    seq.open_choices = seq.params.n
    return children


def choice_ended(seq: Sequence) -> bool:
    """A choice ended: True when it was its request's last."""
    first = seq.parent or seq
    first.open_choices -= 1
    return first.open_choices <= 0


def fits_choices(prompt: int, new_tokens: int, n: int, kv: PagedKVCache) -> bool:
    """n choices of up to `new_tokens` tokens after a shared prompt of `prompt` tokens fit the whole cache:
    the prompt's full blocks once, and each choice's own blocks (its copy of the last one included)."""
    shared = prompt // kv.block_size
    own = kv.blocks_for(prompt % kv.block_size + new_tokens)
    return shared + n * own <= kv.num_blocks
