"""What callers hand the engine and what its steps return: adapters in slots, classification requests
and results, the step's output, and the engine's errors. (Generation requests and their token events
live with the sequence that runs them, in sequence.py.)"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from loraplex_adapters.peft_folder import LoraAdapter
from loraplex_server.engine.sequence import TokenEvent


class AdapterNotFound(KeyError):
    pass


class AdapterInUse(RuntimeError):
    pass


class WrongTask(ValueError):
    """A classification call on a generation adapter, or the reverse."""


class EngineFailure(RuntimeError):
    """The engine could not compute this request (the others in its step went on)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"the server failed to compute this request ({type(cause).__name__}); "
                         "other requests are not affected; retrying it will likely fail again")


@dataclass(frozen=True)
class SlotAdapter:
    """An adapter written into a device slot: what a step needs to run rows on it."""

    slot: int
    task: str  # "classification" (it has a head) or "generation"
    labels: tuple[str, ...] = ()  # a classifier's label names, one per head output
    identity: str = ""  # what its prefix-cache blocks are keyed by: one per adapter version, never reused


@dataclass
class Classification:
    label: str
    score: float
    scores: dict[str, float]


@dataclass
class Generation:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


_classify_ids = itertools.count(1)


@dataclass
class ClassifyRequest:
    """Texts for one classification adapter; its results come out of one step() as a Classified."""

    token_ids: list[list[int]]
    adapter: str | None = None  # the adapter's name or key (for logs and metrics; the slot runs it)
    request_id: str = field(default_factory=lambda: f"cls-{next(_classify_ids)}")


@dataclass
class Classified:
    """A classification request ended: its results, in text order, or why it failed."""

    request_id: str
    results: list[Classification] | None
    error: BaseException | None = None


@dataclass
class StepOutput:
    """What one step did: token events of generation rows, and the classification requests that ended."""

    events: list[TokenEvent] = field(default_factory=list)
    classified: list[Classified] = field(default_factory=list)
    embedded: list = field(default_factory=list)  # embedding.Embedded: the embedding requests that ended


def adapter_labels(adapter: LoraAdapter, labels: list[str] | None) -> tuple[str, ...]:
    """The label names of a classifier (LABEL_i by default); refuses a count that is not its head's."""
    if adapter.head is None:
        return ()
    labels = list(labels) if labels else [f"LABEL_{i}" for i in range(adapter.head.num_labels)]
    if len(labels) != adapter.head.num_labels:
        raise ValueError(f"{len(labels)} label names for a head with {adapter.head.num_labels} outputs")
    return tuple(labels)
