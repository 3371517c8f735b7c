"""Held-out evaluation for the trainer: the metrics, which of two evaluations is better (early stopping),
and the honest base an adapter must beat before it is written."""

from __future__ import annotations

import math
from collections import Counter

import torch

from .training_batches import batches
from .training_data import ClassificationData


def macro_f1(gold: list[int], predicted: list[int], num_labels: int) -> float:
    scores = []
    for label in range(num_labels):
        tp = sum(g == p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(p == label != g for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label != p for g, p in zip(gold, predicted, strict=True))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / num_labels


@torch.inference_mode()
def evaluate(model, tokenizer, config, data, device) -> dict:
    """Accuracy, macro-F1 and mean loss (classification), or completion loss and perplexity (generation)."""
    was_training = model.training
    model.eval()
    order = list(range(len(data)))
    if config.task == "classification":
        predicted, total = [], 0.0
        for batch in batches(config, tokenizer, data, order, device, truncate=False):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            total += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
            predicted += logits.argmax(-1).tolist()
        accuracy = sum(p == g for p, g in zip(predicted, data.labels, strict=True)) / len(data)
        result = {"accuracy": accuracy, "macro_f1": macro_f1(data.labels, predicted, len(data.label_names)),
                  "loss": total / len(data), "examples": len(data)}
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


MIN_LOSS_GAIN = 0.01  # a loss that is not 1 % lower is a tie: it neither keeps new weights nor resets patience


def better(task: str, candidate: dict, best: dict | None) -> bool:
    """Early stopping's order: a higher accuracy, then macro-F1; on a tie there, a loss at least 1 % lower
    (a tiny held-out set often ties on accuracy while the loss still says which weights generalize);
    generation: a loss at least 1 % lower."""
    if best is None:
        return True
    lower_loss = candidate["loss"] < best["loss"] * (1 - MIN_LOSS_GAIN)
    if task == "classification":
        scores, best_scores = (candidate["accuracy"], candidate["macro_f1"]), (best["accuracy"], best["macro_f1"])
        return scores > best_scores or (scores == best_scores and lower_loss)
    return lower_loss


def majority_class(train: ClassificationData, held_out: ClassificationData) -> dict:
    """Always answering the training data's most frequent label, scored on the held-out rows."""
    label = Counter(train.labels).most_common(1)[0][0]
    predicted = [label] * len(held_out)
    accuracy = sum(g == label for g in held_out.labels) / len(held_out)
    return {"label": train.label_names[label], "accuracy": accuracy,
            "macro_f1": macro_f1(held_out.labels, predicted, len(held_out.label_names)), "examples": len(held_out)}


def base_to_beat(task: str, before: dict, majority: dict | None) -> dict:
    """The base, honestly: for a classifier the better of the untrained head ("before") and the majority
    class; for a generator the base model itself (LoRA starts at zero, so "before" is exactly the base)."""
    if task != "classification":
        return {"source": "base model", **before}
    candidates = [("untrained head", before), (f"majority class {majority['label']!r}", majority)]
    source, best = max(candidates, key=lambda c: (c[1]["accuracy"], c[1]["macro_f1"]))
    return {"source": source, "accuracy": best["accuracy"], "macro_f1": best["macro_f1"]}


def beats(task: str, after: dict, base: dict) -> bool:
    """Strictly better than the base on held-out data: higher accuracy, or equal accuracy and a higher
    macro-F1; for generation, a lower completion loss."""
    if task == "classification":
        return (after["accuracy"], after["macro_f1"]) > (base["accuracy"], base["macro_f1"])
    return after["loss"] < base["loss"]


def headline(task: str, metrics: dict) -> str:
    if task == "classification":
        return f"accuracy {metrics['accuracy']:.3f} (macro-F1 {metrics['macro_f1']:.3f})"
    return f"perplexity {metrics['perplexity']:.2f} (loss {metrics['loss']:.4f})"
