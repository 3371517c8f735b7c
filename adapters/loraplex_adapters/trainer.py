"""LoRA fine-tuning with PEFT: classification or generation, evaluated before and after, best epoch kept.

A plain PyTorch loop (no HF Trainer), so what runs is visible: seeded shuffling and dropout, AdamW with
linear warmup/decay, gradient accumulation, one checkpoint per epoch to resume from. The output is
a standard PEFT folder plus `loraplex.json` (task, labels, base fingerprint, training config, data
hash, metrics).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .compute_dtype import auto_dtype
from .embedded_base import embedded_default_path
from .fingerprint import file_sha256, model_fingerprint
from .manifest import Manifest, write_manifest
from .quantization import quantization_config
from .training_batches import batches, bucketed_order
from .training_data import (
    DataError,
    classification_data,
    generation_data,
    read_records,
    split,
)

# LoRA targets per architecture (config.model_type); others fall back to PEFT's own defaults.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"], "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"], "bert": ["query", "key", "value"],
}
CHECKPOINT = "checkpoint"


@dataclass
class TrainConfig:
    task: str  # "classification" or "generation"
    data: str
    output: str
    name: str = ""
    base: str | None = None  # a local HF folder; None = the embedded default base
    eval_data: str | None = None
    eval_fraction: float = 0.1
    # more held-out sets, {name: file}, scored with the kept weights into the manifest's metrics["held_out"]
    extra_eval: dict[str, str] = field(default_factory=dict)
    text_field: str = "text"
    label_field: str = "label"
    labels: list[str] = field(default_factory=list)
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)
    learning_rate: float = 2e-4
    epochs: int = 3
    batch_size: int = 16
    grad_accum: int = 1
    warmup: float = 0.06  # fraction of the optimizer steps
    weight_decay: float = 0.0
    max_length: int = 128
    seed: int = 0
    dtype: str = "auto"  # auto: bfloat16 on CUDA (nf4 base, QLoRA) and on CPUs with native bf16, else float32
    quantize: str = "auto"  # auto: nf4 on CUDA, none on CPU
    resume: bool = False


@dataclass
class TrainResult:
    output: Path
    manifest: Manifest
    before: dict
    after: dict
    best_epoch: int
    history: list[dict]
    held_out: dict[str, dict] = field(default_factory=dict)


def load_data(config: TrainConfig):
    """(train, eval) checked and split; raises DataError before any model is loaded."""
    if config.task not in ("classification", "generation"):
        raise DataError(f"unknown task {config.task!r}: classification or generation")
    data = _task_data(config, config.data, None)
    if config.eval_data:
        return data, _task_data(config, config.eval_data, data)
    return split(data, config.eval_fraction, config.seed)


def _task_data(config: TrainConfig, path: str, training=None):
    """One file's rows for the task; held-out classification rows (training given) take the training labels."""
    records = read_records(path)
    if config.task == "classification":
        if training is None:
            return classification_data(records, path, config.text_field, config.label_field, config.labels or None)
        return classification_data(records, path, config.text_field, config.label_field, training.label_names,
                                   training_labels=False)
    return generation_data(records, path, config.prompt_field, config.completion_field, config.messages_field)


# -- model ------------------------------------------------------------------------------------------

def _base_dir(base: str | None) -> Path:
    return Path(base) if base else embedded_default_path()


def _load_model(config: TrainConfig, base_dir: Path, num_labels: int):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Our own tqdm bar shows training; HF's load bar and its report of the new (untrained) head are noise.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    quantize = ("nf4" if cuda else "none") if config.quantize == "auto" else config.quantize
    dtype = auto_dtype("cuda" if cuda else "cpu") if config.dtype == "auto" else getattr(torch, config.dtype)
    kwargs: dict = {"dtype": dtype}
    if quantize != "none":
        kwargs["quantization_config"] = quantization_config(quantize, dtype)
        kwargs["device_map"] = {"": 0}
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model_type = AutoConfig.from_pretrained(base_dir).model_type
    if config.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels, **kwargs)
        model.config.pad_token_id = tokenizer.pad_token_id
        task = TaskType.SEQ_CLS
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
        task = TaskType.CAUSAL_LM
    if quantize != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif cuda:
        model = model.to("cuda")
    targets = config.target_modules or DEFAULT_TARGETS.get(model_type)
    lora = LoraConfig(task_type=task, r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=targets)
    return get_peft_model(model, lora), tokenizer, quantize


# -- evaluation -------------------------------------------------------------------------------------

def macro_f1(gold: list[int], predicted: list[int], num_labels: int) -> float:
    scores = []
    for label in range(num_labels):
        tp = sum(g == p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(p == label != g for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label != p for g, p in zip(gold, predicted, strict=True))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / num_labels


@torch.inference_mode()
def evaluate(model, tokenizer, config: TrainConfig, data, device) -> dict:
    """Accuracy and macro-F1 (classification), or completion loss and perplexity (generation)."""
    was_training = model.training
    model.eval()
    order = list(range(len(data)))
    if config.task == "classification":
        predicted = []
        for batch in batches(config, tokenizer, data, order, device, truncate=False):
            predicted += model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1).tolist()
        accuracy = sum(p == g for p, g in zip(predicted, data.labels, strict=True)) / len(data)
        result = {"accuracy": accuracy, "macro_f1": macro_f1(data.labels, predicted, len(data.label_names)),
                  "examples": len(data)}
    else:
        total, tokens = 0.0, 0
        for batch in batches(config, tokenizer, data, order, device, truncate=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                                       reduction="sum")
            total += losses.item()
            tokens += int((labels != -100).sum())
        loss = total / max(tokens, 1)
        result = {"loss": loss, "perplexity": math.exp(loss), "examples": len(data)}
    model.train(was_training)
    return result


def _better(task: str, candidate: dict, best: dict | None) -> bool:
    if best is None:
        return True
    if task == "classification":
        return (candidate["accuracy"], candidate["macro_f1"]) > (best["accuracy"], best["macro_f1"])
    return candidate["loss"] < best["loss"]


# -- training ---------------------------------------------------------------------------------------

def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    train_data, eval_data = load_data(config)  # bad data fails here, before the model loads
    extra_data = {name: _task_data(config, path, train_data) for name, path in config.extra_eval.items()}
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(config.seed)
    base_dir = _base_dir(config.base)
    num_labels = len(train_data.label_names) if config.task == "classification" else 0
    model, tokenizer, quantize = _load_model(config, base_dir, num_labels)
    device = next(model.parameters()).device
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = math.ceil(math.ceil(len(train_data) / config.batch_size) / config.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup * total_steps), total_steps)

    state = {"epoch": 0, "history": [], "before": None, "best": None, "best_epoch": 0, "best_weights": None}
    checkpoints = sorted((output / CHECKPOINT).glob("epoch-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    if config.resume and checkpoints:
        checkpoint = checkpoints[-1]
        saved = torch.load(checkpoint, weights_only=True)
        if saved["config"] != json.dumps(_resumable(config), sort_keys=True):
            raise DataError(f"{checkpoint} was written with other settings; remove it or train without --resume")
        model.load_state_dict(saved["weights"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state = {k: saved[k] for k in state}
        state["history"] = json.loads(state["history"])
        state["before"], state["best"] = json.loads(state["before"]), json.loads(state["best"])
    if state["before"] is None:  # LoRA's B starts at zero: this is the base (with an untrained head)
        state["before"] = evaluate(model, tokenizer, config, eval_data, device)

    model.train()
    bar = _progress(total_steps, state["epoch"] * steps_per_epoch, progress)
    for epoch in range(state["epoch"], config.epochs):
        order = bucketed_order(train_data, config.batch_size, config.seed + epoch)
        for micro, batch in enumerate(batches(config, tokenizer, train_data, order, device)):
            loss = model(**batch).loss / config.grad_accum
            loss.backward()
            if (micro + 1) % config.grad_accum == 0 or (micro + 1) * config.batch_size >= len(train_data):
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item() * config.grad_accum:.4f}")
        metrics = evaluate(model, tokenizer, config, eval_data, device)
        state["history"].append({"epoch": epoch + 1, **metrics})
        if _better(config.task, metrics, state["best"]):
            state["best"], state["best_epoch"], state["best_weights"] = metrics, epoch + 1, _trainable_state(model)
        state["epoch"] = epoch + 1
        _save_checkpoint(output / CHECKPOINT, config, model, optimizer, scheduler, state)
        bar.write(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples"))
    bar.close()

    model.load_state_dict(state["best_weights"], strict=False)
    held_out = {name: evaluate(model, tokenizer, config, data, device) for name, data in extra_data.items()}
    adapter_dir = output / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    model.save_pretrained(adapter_dir)
    manifest = Manifest(name=config.name or output.name, labels=list(getattr(train_data, "label_names", [])),
                        extra={"task": config.task, "base_fingerprint": model_fingerprint(base_dir),
                               "metrics": {"before": state["before"], "after": state["best"],
                                           "best_epoch": state["best_epoch"], "history": state["history"],
                                           "held_out": held_out,
                                           "training": {**asdict(config), "quantize": quantize,
                                                        "data_sha256": "sha256:" + file_sha256(Path(config.data))}}})
    write_manifest(adapter_dir, manifest)
    return TrainResult(adapter_dir, manifest, state["before"], state["best"], state["best_epoch"], state["history"],
                       held_out)


def _resumable(config: TrainConfig) -> dict:
    """The settings a checkpoint must share with the run resuming it."""
    return {k: v for k, v in asdict(config).items() if k not in ("resume", "output", "name")}


def _save_checkpoint(folder: Path, config, model, optimizer, scheduler, state) -> None:
    """OUTPUT/checkpoint/epoch-N.pt, written whole then renamed; the previous one stays until the next."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch-{state['epoch']}.pt"
    partial = path.with_suffix(".partial")
    torch.save({"config": json.dumps(_resumable(config), sort_keys=True), "weights": _trainable_state(model),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                "epoch": state["epoch"], "history": json.dumps(state["history"]), "before": json.dumps(state["before"]),
                "best": json.dumps(state["best"]), "best_epoch": state["best_epoch"],
                "best_weights": state["best_weights"]}, partial)
    partial.replace(path)
    for old in folder.glob("epoch-*.pt"):
        if int(old.stem.split("-")[1]) < state["epoch"] - 1:
            old.unlink()
