"""Vectorized sampling, incremental detokenizing and stop strings, checked against references.

The references are the straightforward versions: a full `tokenizer.decode` of every prefix, and a copy of
the Sequence.append that decoded the whole output each token (OldSequence below).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import loraplex_server.engine.sequence as sequence_module
from loraplex_server.engine.detokenizer import IncrementalDetokenizer, pending_stop_prefix
from loraplex_server.engine.sampling import SamplingParams, gumbel_noise, row_keys, sample
from loraplex_server.engine.sequence import GenerationRequest, Sequence
from tiny_models import write_tokenizer

MULTILINGUAL = [
    "héllo wörld, naïve café — déjà vu",
    "日本語のテキストと中文字符",
    "emoji 🎉🚀 thumbs 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "Ελληνικά και русский текст",
    "مرحبا بالعالم",
    "the quick brown fox jumps over the lazy dog",
    "stop here. stop there. the end of the story",
    "a literal replacement char \ufffd in the middle",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from loraplex_adapters.embedded_base import embedded_default_path

    try:
        return AutoTokenizer.from_pretrained(embedded_default_path())
    except Exception as exc:  # pragma: no cover - the embedded base is an optional download
        pytest.skip(f"embedded base unavailable: {exc}")


def byte_token(tokenizer, byte: int) -> int:
    """The id of the byte-level (GPT-2 alphabet) token for one raw byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char = chr(byte) if byte in printable else chr(256 + sorted(set(range(256)) - set(printable)).index(byte))
    return tokenizer.convert_tokens_to_ids(char)


# -- reference: the Sequence.append this change replaced --------------------------------------------


class OldSequence:
    def __init__(self, params: SamplingParams, eos_ids: set[int], prompt_len: int, max_total_tokens: int) -> None:
        self.params, self.eos_ids = params, eos_ids
        self.prompt_len, self.max_total_tokens = prompt_len, max_total_tokens
        self.output_ids: list[int] = []
        self.text = ""
        self._emitted = 0
        self.finish_reason: str | None = None

    def append(self, token_id: int, tokenizer) -> tuple[str, bool, str | None]:
        self.output_ids.append(token_id)
        stops = self.params.stop
        if token_id in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = "eos"
        else:
            full = tokenizer.decode(self.output_ids, skip_special_tokens=True)
            if not full.endswith("\ufffd"):
                self.text = full
            cut = min((i for i in (self.text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
            elif (len(self.output_ids) >= self.params.max_new_tokens
                  or self.prompt_len + len(self.output_ids) >= self.max_total_tokens):
                self.finish_reason = "length"
        finished = self.finish_reason is not None
        ready = len(self.text) if finished else len(self.text) - pending_stop_prefix(self.text, stops)
        delta = self.text[self._emitted:ready]
        self._emitted = max(self._emitted, ready)
        return delta, finished, self.finish_reason


def new_sequence(params: SamplingParams, eos_ids: set[int], max_total_tokens: int = 10**9) -> Sequence:
    return Sequence(GenerationRequest([1], None, params), 0, eos_ids, max_total_tokens)


def run_both(tokenizer, ids: list[int], params: SamplingParams, max_total_tokens: int = 10**9) -> list[str]:
    """Feed ids to the new and the old Sequence; every event must agree. Returns the new deltas."""
    eos_ids = {tokenizer.eos_token_id}
    new, old = new_sequence(params, eos_ids, max_total_tokens), OldSequence(params, eos_ids, 1, max_total_tokens)
    deltas = []
    for token in ids:
        event = new.append(token, tokenizer)
        assert (event.text, event.finished, event.finish_reason) == old.append(token, tokenizer)
        deltas.append(event.text)
        if event.finished:
            break
    assert new.text == old.text
    assert new.finish_reason == old.finish_reason
    return deltas


# -- incremental detokenizing -----------------------------------------------------------------------


def check_incremental(tokenizer, ids: list[int]) -> None:
    """At every step the released text is the full decode (or, while it ends in \\ufffd, the last one
    that did not), and the deltas add up to it."""
    detok = IncrementalDetokenizer(tokenizer)
    deltas, stable = [], ""
    for i, token in enumerate(ids):
        deltas.append(detok.add(token))
        full = tokenizer.decode(ids[:i + 1], skip_special_tokens=True)
        if not full.endswith("\ufffd"):
            stable = full
            assert detok.text == full, (i, ids[:i + 1])
        assert detok.text == stable, (i, ids[:i + 1])
        assert len(detok) == len(stable)
    assert "".join(deltas) == detok.text


def random_id_sequences(tokenizer, rng: random.Random, count: int, length: int) -> list[list[int]]:
    vocab = len(tokenizer)
    specials = list(tokenizer.all_special_ids)
    encoded = [tokenizer.encode(s, add_special_tokens=False) for s in MULTILINGUAL]
    out = []
    for _ in range(count):
        kind = rng.randrange(3)
        if kind == 0:  # any ids at all, specials included
            out.append([rng.randrange(vocab) for _ in range(length)])
        elif kind == 1:  # real multilingual text with specials sprinkled in
            ids = [t for s in rng.sample(encoded, 3) for t in s]
            for _ in range(3):
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
            out.append(ids[:length])
        else:  # text cut at random token boundaries and glued back in another order
            ids = [t for s in encoded for t in s]
            cuts = sorted(rng.sample(range(1, len(ids)), 6))
            parts = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True)]
            rng.shuffle(parts)
            out.append([t for p in parts for t in p][:length])
    return out


def test_incremental_text_matches_full_decode_at_every_step(tok):
    rng = random.Random(0)
    for text in MULTILINGUAL:
        check_incremental(tok, tok.encode(text, add_special_tokens=False))
    for ids in random_id_sequences(tok, rng, 60, 120):
        check_incremental(tok, ids)


def test_multibyte_characters_split_over_byte_tokens(tok):
    b = lambda x: byte_token(tok, x)  # noqa: E731
    euro = [b(0xE2), b(0x82), b(0xAC)]  # "€" one byte per token
    party = [b(0xF0), b(0x9F), b(0x8E), b(0x89)]  # "🎉"
    letter = tok.encode("a", add_special_tokens=False)
    cases = [
        euro + letter + party,
        [b(0xE2)] + letter,  # a lead byte that never completes
        [b(0x80)] * 3 + letter,  # stray continuation bytes
        [b(0xF0), b(0x9F)] + [tok.eos_token_id] + [b(0x8E), b(0x89)],  # a skipped special inside a character
        [b(0xE2)] + [b(0x80)] * 40 + letter + party,  # a long run that is never valid: the window is split
        [b(0xF0)] * 30 + euro,
        party * 20,
    ]
    for ids in cases:
        check_incremental(tok, ids)


@pytest.mark.slow
def test_incremental_text_matches_full_decode_smollm2(smol_tok):
    rng = random.Random(1)
    for text in MULTILINGUAL:
        check_incremental(smol_tok, smol_tok.encode(text, add_special_tokens=False))
    for ids in random_id_sequences(smol_tok, rng, 30, 80):
        check_incremental(smol_tok, ids)


# -- stop strings -----------------------------------------------------------------------------------


def test_stop_string_across_token_boundaries_is_cut_and_never_emitted(tok):
    text = "hello world, how are you today? fine thanks"
    ids = tok.encode(text, add_special_tokens=False)
    for stop in ("o w", "you today", "? f", "s"):
        deltas = run_both(tok, ids, SamplingParams(max_new_tokens=100, stop=[stop]))
        assert "".join(deltas) == text[:text.find(stop)]
        assert all(stop not in d for d in deltas)


def test_pending_stop_prefix_is_held_and_released_at_the_finish(tok):
    ids = tok.encode("how are you t", add_special_tokens=False)
    deltas = run_both(tok, ids, SamplingParams(max_new_tokens=len(ids), stop=["you there"]))
    assert "".join(deltas[:-1]) == "how are "  # "you t" could still become "you there"
    assert deltas[-1].endswith("you t") and "".join(deltas) == "how are you t"


def test_eos_ends_without_text_and_ignore_eos_runs_on(tok):
    ids = tok.encode("fine thanks", add_special_tokens=False) + [tok.eos_token_id] + tok.encode(" more")
    assert "".join(run_both(tok, ids, SamplingParams(max_new_tokens=50))) == "fine thanks"
    assert "".join(run_both(tok, ids, SamplingParams(max_new_tokens=50, ignore_eos=True))) == "fine thanks more"


def test_sequence_events_match_the_old_implementation(tok):
    rng = random.Random(2)
    sequences = random_id_sequences(tok, rng, 150, 80)
    for text in MULTILINGUAL:
        sequences.append(tok.encode(text, add_special_tokens=False))
    for ids in sequences:
        full = tok.decode(ids, skip_special_tokens=True)
        stops = []
        for _ in range(rng.randrange(4)):
            if full and rng.random() < 0.8:
                start = rng.randrange(len(full))
                stops.append(full[start:start + rng.randrange(1, 6)])
            else:
                stops.append(rng.choice(["zz", "q", "the", "o", " ", "\ufffd", "🎉"]))
        params = SamplingParams(max_new_tokens=rng.randrange(1, len(ids) + 5), stop=stops,
                                ignore_eos=rng.random() < 0.3)
        run_both(tok, ids, params, max_total_tokens=rng.choice([10**9, rng.randrange(2, 90)]))


# -- cost per token ---------------------------------------------------------------------------------


class CountingTokenizer:
    """Forwards decode and counts the ids it is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids = 0

    def decode(self, ids, **kwargs) -> str:
        self.ids += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


def decode_cost_per_step(tokenizer, ids: list[int], params: SamplingParams, monkeypatch) -> tuple[list[int], list[int]]:
    """(ids decoded, characters searched for stop strings) at each step of a Sequence fed `ids`."""
    searched = []
    real_find_stop = sequence_module.find_stop

    def counting_find_stop(tail, stops):
        searched.append(len(tail))
        return real_find_stop(tail, stops)

    monkeypatch.setattr(sequence_module, "find_stop", counting_find_stop)
    counter = CountingTokenizer(tokenizer)
    seq = new_sequence(params, {tokenizer.eos_token_id})
    decoded = []
    for i, token in enumerate(ids):
        before = counter.ids
        event = seq.append(token, counter)
        decoded.append(counter.ids - before)
        assert event.finished == (i == len(ids) - 1)
    return decoded, searched


@pytest.mark.parametrize("kind", ["text", "random", "eos_ignored", "broken_bytes"])
def test_cost_per_token_stays_flat_up_to_2000_tokens(tok, kind, monkeypatch):
    rng = random.Random(3)
    if kind == "text":
        pool = [t for s in MULTILINGUAL for t in tok.encode(s, add_special_tokens=False)]
        ids = (pool * (2000 // len(pool) + 1))[:2000]
    elif kind == "random":
        ids = [rng.randrange(len(tok)) for _ in range(2000)]
    elif kind == "eos_ignored":  # a benchmark run past eos: textless tokens must not pile up in the window
        ids = (tok.encode("start", add_special_tokens=False) + [tok.eos_token_id] * 2000)[:2000]
    else:  # bytes that never make a character: the held run must be split, not decoded whole each time
        ids = [byte_token(tok, 0xE2)] + [byte_token(tok, 0x80)] * 1999
    params = SamplingParams(max_new_tokens=len(ids), stop=["never appears here", "zq"], ignore_eos=True)
    decoded, searched = decode_cost_per_step(tok, ids, params, monkeypatch)
    assert len(decoded) == 2000
    assert max(decoded) <= 40, max(decoded)  # a constant: window of a few tokens, not the output so far
    assert max(decoded[-200:]) <= max(decoded[:200]) + 16
    longest = max(map(len, params.stop))
    assert max(searched) <= 64 + longest  # only the new text plus the longest stop - 1 is searched


@pytest.mark.slow
def test_cost_per_token_stays_flat_smollm2(smol_tok, monkeypatch):
    pool = [t for s in MULTILINGUAL for t in smol_tok.encode(s, add_special_tokens=False)]
    ids = (pool * (2000 // len(pool) + 1))[:2000]
    params = SamplingParams(max_new_tokens=2000, stop=["never appears here"])
    decoded, _ = decode_cost_per_step(smol_tok, ids, params, monkeypatch)
    assert max(decoded) <= 40


# -- sampling ---------------------------------------------------------------------------------------


def logits_batch(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_noise_matches_a_pure_python_splitmix64_and_lowbias32():
    """Pins down the integer hashing: int64/int32 multiplies wrap, shifts are logical."""
    m64, m32 = (1 << 64) - 1, (1 << 32) - 1

    def splitmix(x):
        x &= m64
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & m64
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & m64
        return x ^ (x >> 31)

    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m32
        x ^= x >> 15
        x = (x * 0x846CA68B) & m32
        return x ^ (x >> 16)

    def reference(seed, step, token):
        key = splitmix(splitmix(seed + 0x9E3779B97F4A7C15) + (step + 1) * 0x9E3779B97F4A7C15)
        x = lowbias32(((token * 0x9E3779B9 + (key >> 32)) & m32) ^ (key & m32))
        return -math.log(-math.log(((x >> 9) + 0.5) / 2**23))

    seeds, steps = [0, 1, -1, 2**63 - 1, -(2**63), 123456789], [0, 5, 100_000, 3, 7, 2**40]
    noise = gumbel_noise(row_keys(torch.tensor(seeds), torch.tensor(steps)), 0, 70_000)
    for i, (seed, step) in enumerate(zip(seeds, steps, strict=True)):
        for token in (0, 1, 2, 31_337, 65_535, 69_999):
            assert noise[i, token].item() == pytest.approx(reference(seed, step, token), abs=1e-5)
    assert torch.isfinite(noise).all()


def test_greedy_top_k_1_and_tiny_top_p_are_argmax():
    logits = logits_batch(16, 1000, 0)
    argmax = logits.argmax(-1).tolist()
    n = len(argmax)
    for params in (SamplingParams(), SamplingParams(temperature=1.0, top_k=1),
                   SamplingParams(temperature=1.5, top_p=1e-6), SamplingParams(temperature=1e-6)):
        assert sample(logits, [params] * n, list(range(n)), [0] * n) == argmax
    half = logits.to(torch.bfloat16)  # fp32 cast inside: same as argmax of the fp32 copy
    assert sample(half, [SamplingParams()] * n, [0] * n, [0] * n) == half.float().argmax(-1).tolist()


def test_tiny_temperature_is_greedy_and_never_nan():
    assert SamplingParams(temperature=1e-40).greedy and SamplingParams(temperature=9e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    SamplingParams(temperature=1e-40).validate()
    logits = torch.tensor([[1e30, -1e30, 3e38, 0.0], [0.0, 1.0, 2.0, 3.0]])
    assert sample(logits, [SamplingParams(temperature=1e-40)] * 2, [1, 2], [0, 0]) == [2, 3]
    # The smallest sampling temperature still gives finite scores and the argmax for spread logits.
    assert sample(logits[1:] * 100, [SamplingParams(temperature=1e-5)], [1], [0]) == [3]


OTHER_ROW_PARAMS = [SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(temperature=1.2, top_k=5),
                    SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=2.0, top_k=300, top_p=0.5)]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=40),
                                    SamplingParams(temperature=1.3, top_p=0.9),
                                    SamplingParams(temperature=0.9, top_k=100, top_p=0.95)])
def test_seeded_row_is_the_same_alone_in_a_batch_and_permuted(params):
    vocab = 20_000  # wider than one CPU noise block at batch 9, so the blocks differ from alone
    rng = random.Random(4)
    for step in range(12):
        target = logits_batch(1, vocab, 100 + step)
        others = logits_batch(8, vocab, 200 + step)
        other_params = [rng.choice(OTHER_ROW_PARAMS) for _ in range(8)]
        other_seeds = [rng.randrange(2**63) for _ in range(8)]
        other_steps = [rng.randrange(1000) for _ in range(8)]
        alone = sample(target, [params], [1234], [step])[0]
        batch = torch.cat([others[:3], target, others[3:]])
        rows = list(zip(list(batch), other_params[:3] + [params] + other_params[3:],
                        other_seeds[:3] + [1234] + other_seeds[3:], other_steps[:3] + [step] + other_steps[3:],
                        strict=True))
        tokens = sample(batch, [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
        assert tokens[3] == alone
        order = list(range(9))
        rng.shuffle(order)
        shuffled = [rows[i] for i in order]
        tokens = sample(torch.stack([r[0] for r in shuffled]), [r[1] for r in shuffled], [r[2] for r in shuffled],
                        [r[3] for r in shuffled])
        assert tokens[order.index(3)] == alone


def test_different_seeds_and_steps_draw_differently():
    logits = logits_batch(1, 1000, 5, scale=0.5)
    params = [SamplingParams(temperature=1.0)]
    by_seed = {s: [sample(logits, params, [s], [t])[0] for t in range(20)] for s in (1, 2, 3)}
    assert by_seed[1] != by_seed[2] != by_seed[3] != by_seed[1]
    assert len(set(by_seed[1])) > 10  # steps move the noise too
    assert by_seed[1] == [sample(logits, params, [1], [t])[0] for t in range(20)]  # and it repeats


def test_exactly_one_host_copy(monkeypatch):
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or real(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() syncs"))
    logits = logits_batch(6, 500, 6)
    sample(logits, OTHER_ROW_PARAMS + [SamplingParams(temperature=1.0, top_k=3)], list(range(6)), [0] * 6)
    assert len(calls) == 1


def allowed_tokens(row: torch.Tensor, params: SamplingParams) -> set[int]:
    """The old per-row filter: top-k by value, then top-p keeping the token that crosses it."""
    logits = row / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, params.top_k).values[-1], float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_k_and_top_p_never_choose_outside_the_allowed_set():
    rng = random.Random(7)
    logits = logits_batch(64, 300, 8)
    logits[:8] = logits[:8].round()  # ties at the k-th value: all of them stay allowed
    params = [SamplingParams(temperature=rng.choice([0.3, 1.0, 3.0]), top_k=rng.choice([0, 1, 2, 10, 50]),
                             top_p=rng.choice([1.0, 0.5, 0.9, 0.1])) for _ in range(64)]
    allowed = [allowed_tokens(logits[i], p) for i, p in enumerate(params)]
    for step in range(40):
        tokens = sample(logits, params, [rng.randrange(2**63) for _ in params], [step] * 64)
        for token, ok in zip(tokens, allowed, strict=True):
            assert token in ok


def draw(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """Frequencies over n draws: half from n/2 seeds at step 0, half from one seed over n/2 steps."""
    half = n // 2
    seeds = list(range(half)) + [987654321] * half
    steps = [0] * half + list(range(half))
    tokens = sample(logits.expand(n, -1), [params] * n, seeds, steps)
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1]).double() / n


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7),
                                    SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0,
                                                                                             top_p=0.8)])
def test_empirical_distribution_matches_the_softmax(params):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    n = 20_000
    scaled = logits[0].double() / params.temperature
    keep = torch.tensor(sorted(allowed_tokens(logits[0], params)))
    want = torch.zeros(5, dtype=torch.float64)
    want[keep] = scaled[keep].softmax(-1)
    got = draw(logits, params, n)
    sigma = (want * (1 - want) / n).sqrt()
    # Deterministic (fixed seeds); 4.5 sigma per token leaves room for honest noise, not for a bias.
    assert ((got - want).abs() <= 4.5 * sigma + 1e-12).all(), (got, want)


@pytest.mark.parametrize("field,value", [
    *[("temperature", v) for v in (math.nan, math.inf, -math.inf, -0.5, 100.5)],
    *[("top_p", v) for v in (math.nan, math.inf, -math.inf, -0.1, 0.0, 1.01)],
    *[("top_k", v) for v in (math.nan, math.inf, -math.inf, -1, 1_000_001)],
    *[("max_new_tokens", v) for v in (math.nan, math.inf, -math.inf, -1, 0)],
    *[("seed", v) for v in (math.nan, math.inf, -math.inf, -(2**63) - 1, 2**63)],
])
def test_validate_refuses_non_finite_and_out_of_range(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


def test_validate_limits_stop_strings_and_accepts_the_edges():
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["x"] * 17).validate()
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["x" * 257]).validate()
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=[""]).validate()
    SamplingParams(temperature=100, top_p=1, top_k=1_000_000, seed=-(2**63), stop=["x" * 256] * 16).validate()
    SamplingParams(temperature=0, seed=2**63 - 1).validate()


def test_every_request_gets_a_seed():
    assert SamplingParams(seed=-5).resolved_seed() == -5
    drawn = {SamplingParams().resolved_seed() for _ in range(20)}
    assert len(drawn) == 20 and all(0 <= s < 2**63 for s in drawn)
    params = SamplingParams(temperature=1.0)  # one params object shared by two requests: two seeds
    assert new_sequence(params, set()).seed != new_sequence(params, set()).seed
