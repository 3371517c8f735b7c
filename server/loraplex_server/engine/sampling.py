"""Next-token choice for a whole batch in one vectorized pass: greedy, temperature, top-k, top-p.

Sampling uses the Gumbel-max trick (argmax of logits/T + Gumbel noise is a draw from softmax(logits/T))
with *counter-based* noise: the noise of token j in a row is a hash of (request seed, step, j), computed
with integer hashing on tensors (see "counter-based noise" below). A row's draw therefore depends only
on its own logits, parameters, seed and step: the same tokens alone, in any batch, in any order, with no
per-row generator state to keep.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass, field

import torch

# Below this a temperature is greedy: dividing logits by it could overflow to inf and then NaN (vLLM's
# _SAMPLING_EPS plays the same role).
SAMPLING_EPS = 1e-5
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1_000_000
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's top_logprobs bound)
MAX_N = 16  # choices per request


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # None: a random one per request (resolved_seed)
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks)
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the top k (engine/logprobs.py)
    n: int = 1  # choices sampled from one prompt, sharing its prefill (engine/choices.py)

    def validate(self) -> None:
        """Raise ValueError naming the first field out of its range."""
        # Type checks first: NaN compares false with everything and would slip through a range check,
        # and an infinite max_new_tokens would pass ">= 1".
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if not _is_finite(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not _is_finite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an integer in [0, {MAX_TOP_K}] (0 = no limit), got {self.top_k}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_LENGTH for s in self.stop):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_LENGTH} characters")
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise ValueError(f"seed must be an integer in [{INT64_MIN}, {INT64_MAX}] (int64), got {self.seed}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def resolved_seed(self) -> int:
        """The request's seed, or a fresh random 63-bit one: every request samples from a known seed.

        Called once per request (Sequence does), so requests sharing one params object without a seed
        still draw different tokens.
        """
        return self.seed if self.seed is not None else secrets.randbits(63)


# -- counter-based noise ---------------------------------------------------------------------------
# Two levels: splitmix64 on int64 turns each row's (seed, step) into a 64-bit key (B values, cheap), then
# a 32-bit hash (Wellons' lowbias32) of (token index, key) gives each vocabulary entry its noise. The
# per-entry hash is on int32 because it runs over B x V entries: int32 tensors move half the bytes and
# multiply natively, about 2x faster than a per-entry splitmix64 on CPU. Both wrap on overflow like the
# unsigned originals; >> on signed tensors is arithmetic, so logical shifts mask the sign bits back off.


def _signed(value: int, bits: int) -> int:
    """An unsigned constant as the signed integer with the same bits (torch has no uint64 arithmetic)."""
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


_GOLDEN64 = _signed(0x9E3779B97F4A7C15, 64)
_MIX64_1 = _signed(0xBF58476D1CE4E5B9, 64)
_MIX64_2 = _signed(0x94D049BB133111EB, 64)
_GOLDEN32 = _signed(0x9E3779B9, 32)
_MIX32_1 = _signed(0x7FEB352D, 32)
_MIX32_2 = _signed(0x846CA68B, 32)
_NOISE_BITS = 23  # (k + 0.5) / 2**23 is exact in float32 and stays inside (0, 1)
# CPU only: hash the vocabulary in column blocks of about this many entries, so the int32 temporaries
# stay in cache (2x faster at 64 x 49k); one block on accelerators, where each op is a kernel launch.
_CPU_BLOCK_ENTRIES = 1 << 16


def _shr(x: torch.Tensor, shift: int, bits: int) -> torch.Tensor:
    """Logical right shift of a `bits`-wide signed tensor."""
    return (x >> shift) & ((1 << (bits - shift)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 tensors (a new tensor)."""
    x = x ^ _shr(x, 30, 64)
    x = x * _MIX64_1
    x = x ^ _shr(x, 27, 64)
    x = x * _MIX64_2
    return x ^ _shr(x, 31, 64)


def _low32(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of int64 values as int32 (explicitly, not relying on a narrowing cast's wrap)."""
    x = x & 0xFFFFFFFF
    return (x - ((x >> 31) << 32)).to(torch.int32)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] int64 seeds and steps -> two [B, 1] int32 keys, one independent stream per (seed, step)."""
    key = splitmix64(splitmix64(seeds + _GOLDEN64) + (steps + 1) * _GOLDEN64)
    return _low32(key).unsqueeze(1), _low32(_shr(key, 32, 64)).unsqueeze(1)


def gumbel_noise(keys: tuple[torch.Tensor, torch.Tensor], start: int, end: int) -> torch.Tensor:
    """[B, end - start] float32 Gumbel noise for tokens start..end-1; a pure function of (key, token)."""
    low, high = keys
    x = torch.arange(start, end, dtype=torch.int32, device=low.device) * _GOLDEN32
    x = (x + high) ^ low
    x ^= _shr(x, 16, 32)
    x *= _MIX32_1
    x ^= _shr(x, 15, 32)
    x *= _MIX32_2
    x ^= _shr(x, 16, 32)
    u = _shr(x, 32 - _NOISE_BITS, 32).float().add_(0.5).mul_(2.0**-_NOISE_BITS)
    # u in [2**-24, 1 - 2**-24], so the noise is finite (|g| < 17) and a masked -inf score stays -inf.
    return u.log_().neg_().log_().neg_()


def _add_noise_(scores: torch.Tensor, keys: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    vocab = scores.shape[1]
    block = vocab if scores.device.type != "cpu" else max(1024, _CPU_BLOCK_ENTRIES // scores.shape[0])
    for start in range(0, vocab, block):
        end = min(vocab, start + block)
        scores[:, start:end] += gumbel_noise(keys, start, end)
    return scores


# -- the batch sampler -----------------------------------------------------------------------------


def _filter_top_k_top_p(scores: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask (to -inf) what top-k and then top-p exclude, per row; rows with no limit pass unchanged."""
    vocab = scores.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    need_k, need_p = any(k < vocab for k in ks), any(p < 1.0 for p in top_p)
    if not need_k and not need_p:
        return scores
    device = scores.device
    k_index = torch.tensor([k - 1 for k in ks], device=device).unsqueeze(1)
    limited = torch.tensor([k < vocab for k in ks], device=device).unsqueeze(1)
    if need_p:  # one sort serves both: the k-th largest value is a column of the sorted rows
        # stable: ties keep vocabulary order, so a row's result never depends on its neighbours.
        ordered, order = scores.sort(dim=-1, descending=True, stable=True)
        if need_k:
            kth = torch.where(limited, ordered.gather(1, k_index), float("-inf"))
            ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # by value, so ties with the k-th stay
        probs = ordered.softmax(-1)
        # Rows without top-p get a threshold of 2, which the exclusive cumsum (<= 1) never reaches.
        threshold = torch.tensor([p if p < 1.0 else 2.0 for p in top_p], device=device).unsqueeze(1)
        ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= threshold, float("-inf"))  # keeps the crossing one
        return torch.empty_like(scores).scatter_(1, order, ordered)
    largest = scores.topk(max(k for k in ks if k < vocab), dim=-1).values
    kth = torch.where(limited, largest.gather(1, k_index.clamp(max=largest.shape[1] - 1)), float("-inf"))
    return scores.masked_fill(scores < kth, float("-inf"))


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]) -> list[int]:
    """One token id per row of logits [B, V], in one vectorized pass and one device-to-host copy.

    Greedy rows take the argmax. Other rows: logits / temperature, top-k, top-p, then a Gumbel-max draw
    whose noise is keyed by (seeds[i], steps[i]) — steps[i] is how many tokens row i has generated — so
    the same seed, step and logits give the same token whatever else shares the batch.
    """
    logits = logits.float()  # fp16/bf16 logits lose the small differences that sampling and argmax read
    chosen = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        device = logits.device
        index = torch.tensor(rows, device=device)
        picked = [params[i] for i in rows]
        temperature = torch.tensor([p.temperature for p in picked], device=device).unsqueeze(1)
        scores = logits.index_select(0, index) / temperature
        scores = _filter_top_k_top_p(scores, [p.top_k for p in picked], [p.top_p for p in picked])
        keys = row_keys(torch.tensor([seeds[i] for i in rows], dtype=torch.int64, device=device),
                        torch.tensor([steps[i] for i in rows], dtype=torch.int64, device=device))
        chosen.index_copy_(0, index, _add_noise_(scores, keys).argmax(dim=-1))
    return chosen.tolist()
