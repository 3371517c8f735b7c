"""LoRA fine-tuning with PEFT: classification or generation, the schedule scaled to the data, evaluated
before and after, the best weights kept, and written only when they beat the base on held-out data.

The loop itself is training_loop.fit; the schedule `auto` picks is training_schedule's. The output is a
standard PEFT folder plus `loraplex.json` (task, labels, base fingerprint, training config, data hash,
metrics). An adapter no better than the base (training_eval.base_to_beat) is not written unless
`force` is set: the result says so, and the CLI exits non-zero.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .compute_dtype import auto_dtype
from .embedded_base import embedded_default_path
from .fingerprint import file_sha256, model_fingerprint
from .full_finetune import compare_with_full
from .manifest import Manifest, write_manifest
from .quantization import quantization_config
from .training_data import (
    DataError,
    classification_data,
    generation_data,
    read_records,
    split,
)
from .training_eval import base_to_beat, beats, evaluate, headline, majority_class
from .training_loop import BatchSettings, fit
from .training_noise import quiet_peft_wrapping, silence_import_notices
from .training_schedule import Schedule, auto_schedule

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
    # None: picked from the number of training rows (training_schedule.auto_schedule)
    learning_rate: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    eval_every: int | None = None  # optimizer steps between held-out evaluations
    patience: int | None = None  # evaluations without a better score before stopping; 0 = never stop early
    grad_accum: int = 1
    warmup: float = 0.06  # fraction of the optimizer steps
    weight_decay: float = 0.0
    max_length: int = 128
    seed: int = 0
    dtype: str = "auto"  # auto: bfloat16 on CUDA (nf4 base, QLoRA) and on CPUs with native bf16, else float32
    quantize: str = "auto"  # auto: nf4 on CUDA, none on CPU
    resume: bool = False
    force: bool = False  # write (and let the caller register) an adapter that does not beat the base
    compare_full: bool = False  # also fine-tune every weight of the base on the same split, and compare
    full_learning_rate: float | None = None  # None: training_schedule.FULL_LEARNING_RATE


@dataclass
class TrainResult:
    output: Path | None  # OUTPUT/adapter; None when the adapter was not written
    manifest: Manifest | None
    before: dict
    after: dict
    best_epoch: int
    history: list[dict]
    held_out: dict[str, dict] = field(default_factory=dict)
    base: dict = field(default_factory=dict)  # what the adapter had to beat (training_eval.base_to_beat)
    beats_base: bool = True
    schedule: Schedule | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    comparison: dict | None = None  # compare_full: LoRA against full fine-tuning

    @property
    def written(self) -> bool:
        return self.output is not None


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


def schedule_for(config: TrainConfig, rows: int, full: bool = False) -> Schedule:
    return auto_schedule(rows, config.full_learning_rate if full else config.learning_rate, config.batch_size,
                         config.epochs, config.eval_every, config.patience, config.grad_accum, full=full)


# -- model ------------------------------------------------------------------------------------------

def _base_dir(base: str | None) -> Path:
    return Path(base) if base else embedded_default_path()


def resolved_quantize(config: TrainConfig) -> str:
    if config.quantize != "auto":
        return config.quantize
    return "nf4" if torch.cuda.is_available() else "none"


def load_base(config: TrainConfig, base_dir: Path, num_labels: int, quantize: str, dtype: torch.dtype):
    """The base with its task head (a new score head for classification), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Our own tqdm bar shows training; HF's load bar and its report of the new (untrained) head are noise.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    kwargs: dict = {"dtype": dtype}
    if quantize != "none":
        kwargs["quantization_config"] = quantization_config(quantize, dtype)
        kwargs["device_map"] = {"": 0}
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels, **kwargs)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if quantize == "none" and torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer


def _load_lora_model(config: TrainConfig, base_dir: Path, num_labels: int, quantize: str):
    from peft import LoraConfig, TaskType, get_peft_model

    cuda = torch.cuda.is_available()
    dtype = auto_dtype("cuda" if cuda else "cpu") if config.dtype == "auto" else getattr(torch, config.dtype)
    model, tokenizer = load_base(config, base_dir, num_labels, quantize, dtype)
    if quantize != "none":
        from peft import prepare_model_for_kbit_training

        with quiet_peft_wrapping():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    task = TaskType.SEQ_CLS if config.task == "classification" else TaskType.CAUSAL_LM
    targets = config.target_modules or DEFAULT_TARGETS.get(model.config.model_type)
    lora = LoraConfig(task_type=task, r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=targets)
    with quiet_peft_wrapping():
        return get_peft_model(model, lora), tokenizer


# -- training ---------------------------------------------------------------------------------------

def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    started = time.perf_counter()
    silence_import_notices()  # before peft imports bitsandbytes and torchao
    train_data, eval_data = load_data(config)  # bad data fails here, before the model loads
    extra_data = {name: _task_data(config, path, train_data) for name, path in config.extra_eval.items()}
    quantize = resolved_quantize(config)
    if config.compare_full and quantize != "none":
        raise DataError("--compare-full fine-tunes every weight, which needs an unquantized base: add --quantize none")
    schedule = schedule_for(config, len(train_data))
    torch.manual_seed(config.seed)
    base_dir = _base_dir(config.base)
    num_labels = len(train_data.label_names) if config.task == "classification" else 0
    model, tokenizer = _load_lora_model(config, base_dir, num_labels, quantize)
    device = next(model.parameters()).device
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    run = fit(model, tokenizer, config, schedule, train_data, eval_data, device, output / CHECKPOINT, progress)
    held_out = {name: evaluate(model, tokenizer, BatchSettings.of(config, schedule), data, device)
                for name, data in extra_data.items()}
    majority = majority_class(train_data, eval_data) if config.task == "classification" else None
    base = base_to_beat(config.task, run.before, majority)
    improved = beats(config.task, run.best, base)
    metrics = {"before": run.before, "after": run.best, "base": base, "beats_base": improved,
               "best_epoch": run.best_epoch, "best_step": run.best_step, "stopped_early": run.stopped_early,
               "steps": run.steps, "history": run.history, "held_out": held_out,
               "training": {**asdict(config), "schedule": asdict(schedule), "quantize": quantize,
                            "train_rows": len(train_data),
                            "data_sha256": "sha256:" + file_sha256(Path(config.data))}}
    if majority is not None:
        metrics["majority_class"] = majority
    adapter_dir = output / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)  # never leave an older run's adapter looking like this one's
    manifest = None
    if improved or config.force:
        model.save_pretrained(adapter_dir)
        manifest = Manifest(name=config.name or output.name, labels=list(getattr(train_data, "label_names", [])),
                            extra={"task": config.task, "base_fingerprint": model_fingerprint(base_dir),
                                   "metrics": metrics})
        write_manifest(adapter_dir, manifest)
    seconds = time.perf_counter() - started
    comparison = None
    if config.compare_full:
        del model
        torch.manual_seed(config.seed)  # the same seed as the LoRA run: the same initial score head
        full_model, tokenizer = load_base(config, base_dir, num_labels, "none", torch.float32)
        comparison = compare_with_full(config, full_model, tokenizer, schedule_for(config, len(train_data), full=True),
                                       train_data, eval_data, run.best, seconds, progress)
        if manifest is not None:
            metrics["compare_full"] = comparison
            write_manifest(adapter_dir, manifest)
    return TrainResult(adapter_dir if manifest else None, manifest, run.before, run.best, run.best_epoch, run.history,
                       held_out, base, improved, schedule, run.stopped_early, seconds, comparison)


def summary_line(result: TrainResult) -> str:
    """One line for a person: what the adapter scores against the base, and what happened to it."""
    task = "classification" if "accuracy" in result.after else "generation"
    verdict = "better than the base" if result.beats_base else "NOT better than the base"
    stop = "stopped early" if result.stopped_early else "ran all epochs"
    written = (f"adapter: {result.output}" if result.written and result.beats_base
               else f"written anyway (--force): {result.output}" if result.written else "adapter NOT written")
    return (f"held-out {headline(task, result.after)}, {verdict} ({result.base['source']}: "
            f"{headline(task, result.base)}); best at epoch {result.best_epoch}, {stop}; "
            f"{result.seconds:.0f} s; {written}")
