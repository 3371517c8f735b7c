"""One pure decode step of our Llama-family forward: fixed shapes, no Python decisions on the data.

What a CUDA graph captures and `torch.compile` compiles (step_graphs.py): `rows` single-token rows
(a bucket, padded), each attending over `context` cache positions (a bucket too, masked past the
row's own length). Every input lives in a static buffer (DecodeBuffers) the caller fills before a
replay. LoRA is the gathered form over the slot table's own stacked tables (slot 0 rows add zeros),
so any mix of adapters replays the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from loraplex_server.engine.kv_cache import PagedKVCache
from loraplex_server.engine.models.fused_linear import FusedLinear
from loraplex_server.engine.models.llama import LlamaForward, rms_norm, rotate


@dataclass
class DecodeBuffers:
    """The static inputs of one (rows, context) bucket; a replay reads them where they are."""

    ids: torch.Tensor  # [rows] token ids
    positions: torch.Tensor  # [rows]
    slots: torch.Tensor  # [rows] adapter slot per row (0 = none)
    write_index: torch.Tensor  # [rows] cache position of each row's new token
    kv_index: torch.Tensor  # [rows, context] cache positions of each row's context (padding: any valid one)
    kv_mask: torch.Tensor  # [rows, 1, 1, context] bool: True where the row attends

    @classmethod
    def allocate(cls, rows: int, context: int, device: torch.device) -> DecodeBuffers:
        def longs(*shape):
            return torch.zeros(*shape, dtype=torch.long, device=device)
        return cls(longs(rows), longs(rows), longs(rows), longs(rows), longs(rows, context),
                   torch.zeros(rows, 1, 1, context, dtype=torch.bool, device=device))

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def context(self) -> int:
        return int(self.kv_index.shape[1])


def _project(linear: FusedLinear, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    y = linear.base(x)
    for layer, start, end in linear.adapters:
        a_t = layer.lora_A.index_select(0, slots).transpose(1, 2)  # [rows, in, R]
        b_t = layer.lora_B_t.index_select(0, slots)  # [rows, R, out]
        delta = torch.bmm(torch.bmm(x.unsqueeze(1).to(a_t.dtype), a_t), b_t).squeeze(1)
        y[:, start:end] += delta.to(y.dtype)
    return y


def decode_hidden(model: LlamaForward, cache: PagedKVCache, buffers: DecodeBuffers) -> torch.Tensor:
    """The final-norm hidden states [rows, hidden] of one decode step; writes each row's new key and
    value into the cache."""
    b = buffers
    rows, context = b.rows, b.context
    x = model.embed_rows(b.ids)
    cos, sin = model.rotary(b.positions, x.dtype)
    for layer in model.layers:
        qkv = _project(layer.qkv, rms_norm(x, layer.input_norm, layer.eps), b.slots)
        q, k, v = qkv.split(layer.qkv.sizes, dim=-1)
        group, dim = layer.heads // layer.kv_heads, layer.head_dim
        q = rotate(q.view(rows, layer.heads, dim), cos, sin)
        k = rotate(k.view(rows, layer.kv_heads, dim), cos, sin)
        keys, values = cache.keys[layer.index], cache.values[layer.index]
        keys.index_copy_(0, b.write_index, k)
        values.index_copy_(0, b.write_index, v.view(rows, layer.kv_heads, dim))
        flat = b.kv_index.view(-1)
        k_ctx = keys.index_select(0, flat).view(rows, context, layer.kv_heads, dim).transpose(1, 2)
        v_ctx = values.index_select(0, flat).view(rows, context, layer.kv_heads, dim).transpose(1, 2)
        q = q.view(rows, layer.kv_heads, group, dim)
        o = F.scaled_dot_product_attention(q, k_ctx, v_ctx, attn_mask=b.kv_mask, scale=layer.scaling)
        x = x + _project(layer.o, o.reshape(rows, -1), b.slots)
        gate, up = _project(layer.gate_up, rms_norm(x, layer.post_norm, layer.eps), b.slots).split(
            layer.gate_up.sizes, dim=-1)
        x = x + _project(layer.down, layer.act(gate) * up, b.slots)
    return rms_norm(x, model.norm, model.eps)
