"""The training loop both the LoRA run and the full fine-tuning comparison use.

A plain PyTorch loop (no HF Trainer), so what runs is visible: seeded shuffling and dropout, AdamW with
linear warmup/decay, gradient accumulation, held-out evaluation at evenly spaced steps of each epoch
(about every `eval_every` optimizer steps, the last at the epoch's end), early stopping after
`patience` evaluations without a better score, the best weights kept. With a checkpoint folder it
writes one checkpoint per epoch to resume from.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .training_batches import batches, bucketed_order
from .training_data import DataError
from .training_eval import better, evaluate
from .training_schedule import Schedule, steps_per_epoch


@dataclass
class Fit:
    before: dict
    best: dict
    best_epoch: int
    best_step: int
    history: list[dict]
    stopped_early: bool
    steps: int  # optimizer steps run
    total_steps: int  # optimizer steps the schedule allowed


def evaluation_steps(per_epoch: int, eval_every: int) -> set[int]:
    """Steps within an epoch (1-based) to evaluate at: evenly spaced, about eval_every apart, the last one
    the epoch's end (so that no evaluation repeats one a step or two earlier)."""
    count = math.ceil(per_epoch / max(1, eval_every))
    return {round(per_epoch * j / count) for j in range(1, count + 1)}


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def fit(model, tokenizer, config, schedule: Schedule, train_data, eval_data, device, checkpoints: Path | None,
        progress: bool, desc: str = "train") -> Fit:
    """Train `model`'s trainable parameters; on return it holds the best weights seen on `eval_data`."""
    from transformers import get_linear_schedule_with_warmup

    per_epoch = steps_per_epoch(len(train_data), schedule.batch_size, config.grad_accum)
    total_steps = per_epoch * schedule.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup * total_steps), total_steps)
    # The batch size the loop uses is the schedule's, whatever the config says.
    batching = BatchSettings.of(config, schedule)

    state = {"epoch": 0, "step": 0, "history": [], "before": None, "best": None, "best_epoch": 0, "best_step": 0,
             "best_weights": None, "since_best": 0, "stopped_early": False}
    if checkpoints is not None and config.resume:
        _resume(checkpoints, config, schedule, model, optimizer, scheduler, state)
    if state["before"] is None:  # LoRA's B starts at zero: this is the base (with an untrained head)
        state["before"] = evaluate(model, tokenizer, batching, eval_data, device)

    def held_out_check(epoch: int) -> None:
        metrics = evaluate(model, tokenizer, batching, eval_data, device)
        state["history"].append({"epoch": epoch, "step": state["step"], **metrics})
        if better(config.task, metrics, state["best"]):
            state.update(best=metrics, best_epoch=epoch, best_step=state["step"], since_best=0,
                         best_weights=trainable_state(model))
        else:
            state["since_best"] += 1
        bar.write(f"{desc} epoch {epoch} step {state['step']}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples")
                  + ("" if state["since_best"] else "  (best so far)"), file=sys.stderr)
        if schedule.patience and state["since_best"] >= schedule.patience and state["step"] < total_steps:
            state["stopped_early"] = True

    model.train()
    bar = _progress(total_steps, state["step"], progress, desc)
    for epoch in range(state["epoch"], schedule.epochs):
        if state["stopped_early"]:
            break
        order = bucketed_order(train_data, schedule.batch_size, config.seed + epoch)
        checks = evaluation_steps(per_epoch, schedule.eval_every)
        micro_batches = math.ceil(len(train_data) / schedule.batch_size)
        for micro, batch in enumerate(batches(batching, tokenizer, train_data, order, device)):
            loss = model(**batch).loss / config.grad_accum
            loss.backward()
            if (micro + 1) % config.grad_accum and micro + 1 < micro_batches:
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item() * config.grad_accum:.4f}")
            if state["step"] - epoch * per_epoch in checks:
                held_out_check(epoch + 1)
                if state["stopped_early"]:
                    break
        state["epoch"] = epoch + 1
        if checkpoints is not None:
            _save_checkpoint(checkpoints, config, schedule, model, optimizer, scheduler, state)
    bar.close()
    model.load_state_dict(state["best_weights"], strict=False)
    return Fit(state["before"], state["best"], state["best_epoch"], state["best_step"], state["history"],
               state["stopped_early"], state["step"], total_steps)


@dataclass(frozen=True)
class BatchSettings:
    """What batches() and evaluate() read from a config: the task, the batch size, the max length."""
    task: str
    batch_size: int
    max_length: int

    @classmethod
    def of(cls, config, schedule: Schedule) -> BatchSettings:
        return cls(config.task, schedule.batch_size, config.max_length)


def _resumable(config, schedule: Schedule) -> dict:
    """The settings a checkpoint must share with the run resuming it."""
    after_the_run = ("resume", "output", "name", "force", "compare_full", "full_learning_rate")
    settings = {k: v for k, v in asdict(config).items() if k not in after_the_run}
    return {**settings, "schedule": asdict(schedule)}


_JSON_STATE = ("history", "before", "best")


def _resume(folder: Path, config, schedule, model, optimizer, scheduler, state: dict) -> None:
    saved_files = sorted(folder.glob("epoch-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    if not saved_files:
        return
    checkpoint = saved_files[-1]
    saved = torch.load(checkpoint, weights_only=True)
    if saved["config"] != json.dumps(_resumable(config, schedule), sort_keys=True):
        raise DataError(f"{checkpoint} was written with other settings; remove it or train without --resume")
    model.load_state_dict(saved["weights"], strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    state.update({k: saved[k] for k in state})
    state.update({k: json.loads(saved[k]) for k in _JSON_STATE})


def _save_checkpoint(folder: Path, config, schedule, model, optimizer, scheduler, state) -> None:
    """OUTPUT/checkpoint/epoch-N.pt, written whole then renamed; the previous one stays until the next."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch-{state['epoch']}.pt"
    partial = path.with_suffix(".partial")
    torch.save({**state, **{k: json.dumps(state[k]) for k in _JSON_STATE},
                "config": json.dumps(_resumable(config, schedule), sort_keys=True),
                "weights": trainable_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}, partial)
    partial.replace(path)
    for old in folder.glob("epoch-*.pt"):
        if int(old.stem.split("-")[1]) < state["epoch"] - 1:
            old.unlink()
