"""Tiny random base models and random PEFT adapters, written to disk like real ones."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? fine thanks",
    "adapters share one frozen base model on the device",
    "great movie, awful plot, fine acting, lovely music",
    "stop here. stop there. the end of the story",
]
VOCAB = 320
# Where engine tests run: "cpu" here and in CI; "cuda" in the device check (bench/gpu_check.sh).
TEST_DEVICE = os.environ.get("LORAPLEX_TEST_DEVICE", "cpu")


def write_tokenizer(folder: Path, bert: bool = False) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<eos>", "<bos>", "[CLS]", "[SEP]"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=VOCAB, min_frequency=1, special_tokens=specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", cls_token="[CLS]", sep_token="[SEP]")
    tok.save_pretrained(folder)
    return tok


def make_base(folder: Path, arch: str, seed: int = 0) -> Path:
    """Write a tiny random base of the given architecture ("llama", "gpt2", "bert") with a tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(folder)
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                             **common))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common))
    elif arch == "bert":
        model = BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128, **common))
    else:
        raise ValueError(arch)
    # Random init is small; scale up so adapters and tokens change argmaxes visibly.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(folder)
    return folder


@dataclass
class AdapterSpec:
    name: str
    rank: int
    targets: list[str]
    num_labels: int = 0  # > 0: a classification adapter
    alpha: int = 16
    rslora: bool = False
    extra: dict = field(default_factory=dict)


def make_adapter(base_dir: Path, out_dir: Path, spec: AdapterSpec, seed: int) -> Path:
    torch.manual_seed(seed)
    if spec.num_labels:
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=spec.num_labels)
        task = TaskType.SEQ_CLS
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        task = TaskType.CAUSAL_LM
    config = LoraConfig(task_type=task, r=spec.rank, lora_alpha=spec.alpha, target_modules=spec.targets,
                        use_rslora=spec.rslora, init_lora_weights=False, lora_dropout=0.0, **spec.extra)
    peft_model = get_peft_model(model, config)
    if spec.num_labels:  # make the head matter: the random init is small
        head = peft_model.base_model.model.score if hasattr(peft_model.base_model.model, "score") \
            else peft_model.base_model.model.classifier
        with torch.no_grad():
            for p in head.parameters():
                p.normal_(0, 1.0)
    peft_model.save_pretrained(out_dir)
    return out_dir


LLAMA_ADAPTERS = [
    AdapterSpec("gen_qv_r4", 4, ["q_proj", "v_proj"]),
    AdapterSpec("gen_all_r8", 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                alpha=8, rslora=True),
    AdapterSpec("gen_mlp_r2", 2, ["down_proj", "up_proj"], extra={"rank_pattern": {"up_proj": 6},
                                                                   "alpha_pattern": {"down_proj": 4}}),
    AdapterSpec("cls3_r2", 2, ["q_proj", "v_proj"], num_labels=3),
    AdapterSpec("cls5_r6", 6, ["k_proj", "o_proj", "up_proj"], num_labels=5, alpha=12),
]
GPT2_ADAPTERS = [
    AdapterSpec("gen_attn_r4", 4, ["c_attn"]),
    AdapterSpec("gen_proj_r8", 8, ["c_attn", "c_proj", "c_fc"], alpha=32),
    AdapterSpec("gen_fc_r2", 2, ["c_fc"]),
    AdapterSpec("cls2_r4", 4, ["c_attn"], num_labels=2),
    AdapterSpec("cls4_r3", 3, ["c_proj"], num_labels=4),
]
BERT_ADAPTERS = [
    AdapterSpec("cls3_qv", 4, ["query", "value"], num_labels=3),
    AdapterSpec("cls2_dense", 8, ["dense"], num_labels=2),
]
