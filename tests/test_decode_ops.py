"""Our CPU step ops (csrc/decode_ops.cpp) against the torch ops they replace, in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine, GenerationRequest
from loraplex_server.engine.models.llama import rms_norm, rotate
from loraplex_server.engine.sampling import SamplingParams

DTYPES = [torch.float32, torch.bfloat16]


def exact_in(dtype: torch.dtype) -> dict:
    """fp32 differs only in summation order; bf16 also by a last-bit rounding of that."""
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_rms_norm_and_residual_add_match_torch(ops, dtype, rows):
    torch.manual_seed(rows)
    x, delta, weight = torch.randn(rows, 96).to(dtype), torch.randn(rows, 96).to(dtype), torch.randn(96).to(dtype)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), **exact_in(dtype))
    expected_x = x + delta
    normed = ops.add_rms_norm_(x, delta, weight, 1e-5)
    assert torch.equal(x, expected_x), "the residual is added in place, rounded as torch's add rounds"
    torch.testing.assert_close(normed, rms_norm(expected_x, weight, 1e-5), **exact_in(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_matches_rotate_and_leaves_other_columns(ops, dtype):
    torch.manual_seed(0)
    tokens, heads, dim, extra = 5, 4, 16, 24
    qkv = torch.randn(tokens, heads * dim + extra).to(dtype)
    angles = torch.rand(tokens, dim // 2) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    expected = rotate(qkv[:, :heads * dim].view(tokens, heads, dim), cos[:, None], sin[:, None]).reshape(tokens, -1)
    tail = qkv[:, heads * dim:].clone()
    ops.rotary_(qkv, cos, sin, heads, dim)
    torch.testing.assert_close(qkv[:, :heads * dim], expected, **exact_in(dtype))
    assert torch.equal(qkv[:, heads * dim:], tail)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(ops, dtype):
    gate_up = (3 * torch.randn(7, 64)).to(dtype)
    gate_up[0, :8] = torch.tensor([-200.0, -100.0, -88.0, -30.0, 30.0, 88.0, 100.0, 200.0])  # past exp's range
    gate, up = gate_up.split(32, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up, **exact_in(dtype))


def reference_attention(q, keys, values, kv_index, lengths, scale):
    rows, heads, dim = q.shape
    out = []
    for r in range(rows):
        index = kv_index[r, :lengths[r]]
        k, v = keys[index].transpose(0, 1).float(), values[index].transpose(0, 1).float()  # [kv_heads, n, dim]
        group = heads // k.shape[0]
        qr = q[r].float().view(k.shape[0], group, dim)
        out.append(F.scaled_dot_product_attention(qr, k, v, scale=scale).reshape(heads, dim))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3)])
def test_decode_attention_reads_scattered_positions(ops, dtype, heads, kv_heads):
    torch.manual_seed(heads)
    dim, positions, rows, context = 32, 200, 4, 50
    keys, values = torch.randn(positions, kv_heads, dim).to(dtype), torch.randn(positions, kv_heads, dim).to(dtype)
    kv_index = torch.stack([torch.randperm(positions)[:context] for _ in range(rows)])
    lengths = torch.tensor([1, 17, 50, 33])
    # The query as the forward holds it: heads of a wider q|k|v row, so rows are strided.
    q = torch.randn(rows, (heads + 2 * kv_heads) * dim).to(dtype)[:, :heads * dim].view(rows, heads, dim)
    got = ops.decode_attention(q, keys, values, kv_index, lengths, 0.125)
    expected = reference_attention(q, keys, values, kv_index, lengths, 0.125)
    torch.testing.assert_close(got.float(), expected, **exact_in(dtype))


@pytest.mark.parametrize("lengths,index_fill", [([0, 5], 0), ([6, 5], 0), ([-1, 5], 0), ([5, 5], 200),
                                                ([5, 5], -1)])
def test_decode_attention_refuses_positions_outside_the_cache(ops, lengths, index_fill):
    keys = torch.randn(200, 2, 8)
    kv_index = torch.full((2, 5), index_fill) if index_fill else torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(RuntimeError, match="length|cache position"):
        ops.decode_attention(torch.randn(2, 2, 8), keys, keys, kv_index, torch.tensor(lengths), 1.0)


def test_ops_refuse_mismatched_inputs(ops):
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(x, torch.randn(15), 1e-5)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.rms_norm(x, torch.randn(16).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        ops.rms_norm(x.half(), torch.randn(16).half(), 1e-5)
    with pytest.raises(RuntimeError, match="delta"):
        ops.add_rms_norm_(x, torch.randn(2, 16), torch.randn(16), 1e-5)
    with pytest.raises(RuntimeError, match="cos, sin"):
        ops.rotary_(x, torch.randn(3, 4), torch.randn(3, 4), 2, 8)


def bf16_engine(tiny) -> tuple[Engine, list[str]]:
    """The tiny Llama in bf16 with its generation adapters loaded; returns the engine and their names."""
    base_dir, adapters = tiny("llama")
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="bfloat16", device="cpu"), max_adapters=8)
    names = [n for n, (_, spec) in adapters.items() if not spec.num_labels]
    for name in names:
        engine.load_adapter(name, adapters[name][0])
    return engine, names


def first_tokens(engine: Engine, rows: list[str | None], new_tokens: int = 2) -> list[list[tuple[int, float]]]:
    """(token, logprob) of the first tokens of four prompts on these adapters, run together to the end."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=0)
    prompts = [[5, 6, 7], [10, 11], [20, 21, 22, 23], [30]]
    requests = [GenerationRequest(p, a, params) for p, a in zip(prompts, rows, strict=True)]
    for request in requests:
        engine.submit(request)
    got: dict[str, list[tuple[int, float]]] = {}
    while engine.has_work:
        for event in engine.step().events:
            if event.token_id is not None:
                got.setdefault(event.request_id, []).append((event.token_id, event.logprobs.logprob))
    return [got[r.request_id] for r in requests]


def assert_same_to_bf16(ours: list[list[tuple[int, float]]], theirs: list[list[tuple[int, float]]]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert [t for t, _ in a] == [t for t, _ in b]
        torch.testing.assert_close(torch.tensor([p for _, p in a]), torch.tensor([p for _, p in b]), atol=0.05, rtol=0)


def test_bf16_engine_steps_on_the_ops_match_the_torch_path(tiny, ops):
    """A bf16 engine's prefill and first decode step of mixed adapters give the torch path's tokens and
    logprobs to bf16 precision."""
    engine, names = bf16_engine(tiny)
    forward = engine.runner.forward
    assert forward.ops is ops
    rows = [*names[:3], None]
    with_ops = first_tokens(engine, rows)
    forward.ops = None
    assert_same_to_bf16(with_ops, first_tokens(engine, rows))
