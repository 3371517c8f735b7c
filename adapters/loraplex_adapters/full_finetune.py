"""`--compare-full`: fine-tune every weight of the same base on the same split, with the same epochs and
early stopping, and compare its held-out score with the LoRA adapter's.

Full fine-tuning runs in fp32 whatever the CPU: a bf16 weight cannot take an update of 5e-5 times its
size (bf16 keeps 8 bits of mantissa, so the step rounds away). Its weights are measured, not written.
"""

from __future__ import annotations

import time

from .training_loop import fit
from .training_schedule import Schedule


def ratio(task: str, lora: dict, full: dict) -> float:
    """LoRA / full, so that 1.0 means as good and below 1.0 worse: accuracy for a classifier, the inverse
    perplexity for a generator."""
    if task == "classification":
        return lora["accuracy"] / full["accuracy"] if full["accuracy"] else float("nan")
    return full["perplexity"] / lora["perplexity"]


def compare_with_full(config, model, tokenizer, schedule: Schedule, train_data, eval_data, lora: dict,
                      lora_seconds: float, progress: bool) -> dict:
    """Train `model` (the base with a fresh head, loaded in fp32) with every weight trainable."""
    started = time.perf_counter()
    model.requires_grad_(True)
    device = next(model.parameters()).device
    run = fit(model, tokenizer, config, schedule, train_data, eval_data, device, None, progress, desc="full")
    metric = "accuracy" if config.task == "classification" else "perplexity"
    return {"metric": metric, "lora": lora, "full": run.best, "ratio": ratio(config.task, lora, run.best),
            "full_best_epoch": run.best_epoch, "full_stopped_early": run.stopped_early, "full_steps": run.steps,
            "full_learning_rate": schedule.learning_rate,
            "full_trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "lora_seconds": round(lora_seconds), "full_seconds": round(time.perf_counter() - started)}
