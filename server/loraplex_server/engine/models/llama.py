"""Our own forward for the Llama family (Llama, SmolLM2, Qwen2, Mistral without a sliding window).

The shape of nano-vllm's and gpt-fast's models: one packed sequence of tokens [T] in, the last hidden
states [T, hidden] out, with fused q/k/v and gate/up projections, RMSNorm, rotary and the engine's
paged attention, and a few dozen ops per layer instead of the ~70 of the Hugging Face modules. The
weights are the loaded Hugging Face model's (shared, not copied); transformers stays the reference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from loraplex_server.cpu_ops import cpu_ops
from loraplex_server.engine.models.fused_linear import FusedLinear, panel_columns
from loraplex_server.engine.paged_attention import StepAttention, attend
from loraplex_server.lora.layers import BatchedLoraLinear, BatchState

MODEL_TYPES = ("llama", "qwen2", "mistral")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inverse frequencies that do not depend on the length


def unsupported_reason(model: nn.Module) -> str | None:
    """Why this causal LM cannot run on our forward (None: it can)."""
    config = model.config
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {', '.join(MODEL_TYPES)}"
    if getattr(config, "use_sliding_window", False) or (
            config.model_type == "mistral" and getattr(config, "sliding_window", None)):
        return "sliding-window attention"
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rope type {rope!r} changes with the length"
    projections = [m for layer in model.model.layers for m in (layer.self_attn.q_proj, layer.mlp.gate_proj)]
    if any(type(m) is not nn.Linear for m in projections):
        return "quantized or wrapped linear layers"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm (fp32 statistics, the scale in the model dtype). In fp32 torch's
    fused rms_norm gives the same values in one op instead of six."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [tokens, heads, dim] with cos/sin [tokens, 1, dim] (HF's rotate_half form)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class DecoderLayer:
    def __init__(self, hf_layer: nn.Module, prefix: str, index: int, config) -> None:
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.index = index
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.eps = config.rms_norm_eps
        self.input_norm = hf_layer.input_layernorm.weight
        self.post_norm = hf_layer.post_attention_layernorm.weight
        self.qkv = FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj],
                               [f"{prefix}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")])
        self.o = FusedLinear([attn.o_proj], [f"{prefix}.self_attn.o_proj"])
        self.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj],
                                   [f"{prefix}.mlp.{n}" for n in ("gate_proj", "up_proj")])
        self.down = FusedLinear([mlp.down_proj], [f"{prefix}.mlp.down_proj"])
        self.act = F.silu if config.hidden_act == "silu" else ACT2FN[config.hidden_act]

    @property
    def projections(self) -> tuple[FusedLinear, ...]:
        return self.qkv, self.o, self.gate_up, self.down

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: StepAttention,
                 active: bool) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv(rms_norm(x, self.input_norm, self.eps), active)
        # q and k are adjacent columns: rotated together, one set of ops for both.
        qk = rotate(qkv[:, :self.qkv.spans[1][1]].view(tokens, self.heads + self.kv_heads, self.head_dim), cos, sin)
        q, k = qk[:, :self.heads], qk[:, self.heads:]
        v = qkv[:, self.qkv.spans[2][0]:].view(tokens, self.kv_heads, self.head_dim)
        attn = attend(q, k, v, step, self.index, self.scaling)
        x = x + self.o(attn.reshape(tokens, -1), active)
        gate, up = self.gate_up(rms_norm(x, self.post_norm, self.eps), active).split(self.gate_up.sizes, dim=-1)
        return x + self.down(self.act(gate) * up, active)

    def run_fused(self, x: torch.Tensor, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  step: StepAttention, active: bool, ops, next_norm: torch.Tensor) -> torch.Tensor:
        """The same layer on our CPU ops (csrc/decode_ops.cpp): x (the residual stream) is updated in place,
        `normed` is this layer's input norm of it, and the return is the next norm's (the next layer's input
        norm, or the final norm) of the updated x."""
        tokens = x.shape[0]
        qkv = self.qkv(normed, active)
        ops.rotary_(qkv, cos, sin, self.heads + self.kv_heads, self.head_dim)
        q = qkv[:, :self.qkv.spans[0][1]].view(tokens, self.heads, self.head_dim)
        k = qkv[:, self.qkv.spans[1][0]:self.qkv.spans[1][1]].view(tokens, self.kv_heads, self.head_dim)
        v = qkv[:, self.qkv.spans[2][0]:].view(tokens, self.kv_heads, self.head_dim)
        attn = attend(q, k, v, step, self.index, self.scaling, ops)
        normed = ops.add_rms_norm_(x, self.o(attn.reshape(tokens, -1), active), self.post_norm, self.eps)
        gate_up = self.gate_up(normed, active)
        if self.act is F.silu:
            inner = ops.silu_mul(gate_up)
        else:
            gate, up = gate_up.split(self.gate_up.sizes, dim=-1)
            inner = self.act(gate) * up
        return ops.add_rms_norm_(x, self.down(inner, active), next_norm, self.eps)


class LlamaForward:
    """The decoder stack of a loaded Hugging Face Llama-family model, run on packed rows."""

    def __init__(self, model: nn.Module, state: BatchState) -> None:
        inner = model.model
        config = model.config
        self.state = state
        self.head = _head(model)
        # Tied embeddings whose weights went into bf16 panels are looked up there (embed_rows).
        self.embed = None if self.head.packed is not None and model.config.tie_word_embeddings \
            else inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.eps = config.rms_norm_eps
        rotary = inner.rotary_emb
        self.inv_freq = rotary.inv_freq.float()
        self.rope_scale = float(rotary.attention_scaling)
        prefix = f"{model.base_model_prefix}.layers"
        self.layers = [DecoderLayer(layer, f"{prefix}.{i}", i, config) for i, layer in enumerate(inner.layers)]
        self._bound = -1
        self.ops = _step_ops(self.norm)

    def bind(self, lora_layers: dict[str, BatchedLoraLinear]) -> None:
        """Refresh which projections carry adapters (cheap when nothing was wrapped since the last call)."""
        if len(lora_layers) == self._bound:
            return
        for layer in self.layers:
            for projection in layer.projections:
                projection.bind(lora_layers)
        self._bound = len(lora_layers)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [tokens, 1, head_dim] of the positions, computed as HF's rotary module does."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits [rows, vocab] of final hidden states [rows, hidden]."""
        return self.head.base(hidden)

    def embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings [tokens, hidden] of token ids [tokens]."""
        if self.embed is not None:
            return F.embedding(ids, self.embed)
        return panel_columns(self.head.packed, ids).to(self.norm.dtype)  # token v: column v of the head

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, step: StepAttention) -> torch.Tensor:
        """ids, positions [tokens] -> the final-norm hidden states [tokens, hidden]."""
        x = self.embed_rows(ids)
        cos, sin = self.rotary(positions, x.dtype)
        active = self.state.active
        if self.ops is not None:
            cos, sin = cos.squeeze(1), sin.squeeze(1)
            normed = self.ops.rms_norm(x, self.layers[0].input_norm, self.eps)
            norms = [layer.input_norm for layer in self.layers[1:]] + [self.norm]
            for layer, next_norm in zip(self.layers, norms, strict=True):
                normed = layer.run_fused(x, normed, cos, sin, step, active, self.ops, next_norm)
            return normed
        for layer in self.layers:
            x = layer(x, cos, sin, step, active)
        return rms_norm(x, self.norm, self.eps)


def _step_ops(weight: torch.Tensor):  # any weight of the model: its device and dtype
    """Our compiled CPU ops for the step (cpu_ops.py) where they apply: CPU, fp32 or bf16; else None."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    return cpu_ops()


def _head(model: nn.Module) -> FusedLinear:
    """The LM head in our layout (FusedLinear's rule: bf16 panels, [hidden, vocab] or nn.Linear's). Tied input
    embeddings keep sharing it: they hold the head module's new weight (a view, or the panels' placeholder)."""
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    tied = embeddings.weight is head.weight
    fused = FusedLinear([head], ["lm_head"])
    if tied:
        embeddings.weight = head.weight
    return fused
