"""The training schedule `auto` picks from the data size: learning rate, batch size, epochs, how often to
evaluate, and when to stop.

Found by hand first, then measured (adapters/recipes/README.md, "Default settings"): on the embedded
135M base every recipe learned at lr 1e-3, from 72 rows (batch 8, 4 epochs) to 5,400 (batch 16, 1
epoch), while the old fixed default of 2e-4 for 3 epochs learned nothing from 72 rows. What a small
set lacks is optimizer steps, not a larger step: so the rule keeps lr 1e-3, halves the batch below
500 rows, and gives every run about TARGET_STEPS optimizer steps (more epochs for less data, at most
MAX_EPOCHS), evaluated often enough that early stopping on the held-out metric can cut it short and
keep the best weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LORA_LEARNING_RATE = 1e-3
FULL_LEARNING_RATE = 5e-5  # full fine-tuning moves every weight: the usual 2e-5..5e-5
SMALL_DATA_ROWS = 500  # below this, batches of 8: twice the optimizer steps per epoch
TARGET_STEPS = 100
MAX_EPOCHS = 10
MIN_EVAL_EVERY = 25  # optimizer steps; evaluating more often than this costs more than it tells
EVALUATIONS = 10  # about this many per run on large data, each epoch's end at least
PATIENCE = 3  # evaluations in a row without a better held-out score end the run


@dataclass(frozen=True)
class Schedule:
    learning_rate: float
    batch_size: int
    epochs: int
    eval_every: int  # optimizer steps; every epoch's end is evaluated too
    patience: int  # 0: never stop early

    def describe(self) -> str:
        return (f"lr {self.learning_rate:g}, batch {self.batch_size}, up to {self.epochs} epochs, "
                f"evaluated every {self.eval_every} steps, patience {self.patience}")


def steps_per_epoch(rows: int, batch_size: int, grad_accum: int = 1) -> int:
    return math.ceil(math.ceil(rows / batch_size) / grad_accum)


def auto_schedule(rows: int, learning_rate: float | None = None, batch_size: int | None = None,
                  epochs: int | None = None, eval_every: int | None = None, patience: int | None = None,
                  grad_accum: int = 1, full: bool = False) -> Schedule:
    """The schedule for `rows` training rows; any value given explicitly is kept as given."""
    batch = batch_size or (8 if rows < SMALL_DATA_ROWS else 16)
    per_epoch = steps_per_epoch(rows, batch, grad_accum)
    epochs = epochs or max(1, min(MAX_EPOCHS, math.ceil(TARGET_STEPS / per_epoch)))
    total = per_epoch * epochs
    every = eval_every or min(per_epoch, max(MIN_EVAL_EVERY, math.ceil(total / EVALUATIONS)))
    lr = learning_rate or (FULL_LEARNING_RATE if full else LORA_LEARNING_RATE)
    return Schedule(lr, batch, epochs, every, PATIENCE if patience is None else patience)
