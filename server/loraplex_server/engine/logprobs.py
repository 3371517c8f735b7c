"""Log-probabilities of sampled tokens: the chosen token's and the top-k alternatives', per row that asked.

Convention (vLLM's `logprobs_mode="processed_logprobs"`, which the issue asks for: the values of the
distribution actually sampled from): a sampling row's logprobs are the log-softmax of its logits after
temperature, top-k and top-p, so a token those filters exclude has -inf (written as MIN_LOGPROB, -9999,
as vLLM's OpenAI server writes it: JSON has no infinity). A greedy row (temperature 0) reads the
log-softmax of its raw logits (temperature 1), the distribution its argmax is taken of. vLLM's own
default (`raw_logprobs`) differs for temperature != 1: it always reads the raw logits.

Only the rows that asked are computed, in one vectorized pass over them: rows that did not ask cost
nothing, and a batch where nobody asked never enters this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex_server.engine.sampling import SamplingParams, _filter_top_k_top_p

MIN_LOGPROB = -9999.0  # stands for -inf (a token the row's top-k/top-p excluded)


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's logprob and the `top` most probable tokens with theirs, most probable first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def wants_logprobs(params: SamplingParams) -> bool:
    return params.logprobs is not None


def token_logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]
                   ) -> list[TokenLogprobs | None]:
    """For each row of logits [B, V] whose params ask (params.logprobs = how many top alternatives,
    0..20), the logprobs of its sampled token (tokens[i]) and its top alternatives; None for the others."""
    out: list[TokenLogprobs | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if wants_logprobs(p)]
    if not rows:
        return out
    device = logits.device
    picked = [params[i] for i in rows]
    scores = logits.index_select(0, torch.tensor(rows, device=device)).float()
    # Greedy rows divide by 1 (their raw logits); the others by their temperature, then top-k/top-p as sampled.
    temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in picked], device=device).unsqueeze(1)
    scores = _filter_top_k_top_p(scores / temperature, [0 if p.greedy else p.top_k for p in picked],
                                 [1.0 if p.greedy else p.top_p for p in picked])
    logprobs = scores.log_softmax(-1)  # one fused kernel: faster on CPU than logsumexp and a subtraction
    chosen = logprobs.gather(1, torch.tensor([tokens[i] for i in rows], device=device).unsqueeze(1)).squeeze(1)
    k = max(p.logprobs for p in picked)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    chosen = chosen.clamp(min=MIN_LOGPROB).tolist()
    top_values, top_ids = top_values.clamp(min=MIN_LOGPROB).tolist(), top_ids.tolist()
    for j, (i, p) in enumerate(zip(rows, picked, strict=True)):
        top = tuple(zip(top_ids[j][:p.logprobs], top_values[j][:p.logprobs], strict=True))
        out[i] = TokenLogprobs(tokens[i], chosen[j], top)
    return out
