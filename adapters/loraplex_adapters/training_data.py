"""Training data for `loraplex train`: read CSV/JSONL, check it, split it, before any model is loaded.

Classification: a text column and a label column. Generation: prompt + completion columns, or a
`messages` column of chat turns (the last one, from the assistant, is the completion).
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """The data cannot be trained on; the message says what to fix."""


@dataclass
class ClassificationData:
    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: list[int]) -> ClassificationData:
        return ClassificationData([self.texts[i] for i in index], [self.labels[i] for i in index], self.label_names)


@dataclass
class GenerationData:
    prompts: list[str | list[dict]]  # plain text, or chat turns before the completion
    completions: list[str]

    def __len__(self) -> int:
        return len(self.completions)

    def subset(self, index: list[int]) -> GenerationData:
        return GenerationData([self.prompts[i] for i in index], [self.completions[i] for i in index])


def read_records(path: str | Path) -> list[dict]:
    """Rows of a .csv (header line) or .jsonl (one object a line) file, in UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); convert it, "
                        "e.g. `iconv -f latin1 -t utf-8`") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object")
            records.append(record)
    elif path.suffix.lower() == ".csv":
        records = list(csv.DictReader(io.StringIO(text)))
    else:
        raise DataError(f"{path}: use a .csv or .jsonl file")
    if not records:
        raise DataError(f"{path}: no rows")
    return records


def _column(records: list[dict], field: str, source: str) -> list:
    missing = [i for i, r in enumerate(records) if r.get(field) in (None, "")]
    if len(missing) == len(records):
        columns = sorted({k for r in records for k in r})
        raise DataError(f"{source}: no column {field!r} (columns: {', '.join(columns)})")
    if missing:
        raise DataError(f"{source}: {len(missing)} rows have no {field!r}, the first is row {missing[0] + 1}")
    return [r[field] for r in records]


def classification_data(records: list[dict], source: str, text_field: str = "text", label_field: str = "label",
                        label_names: list[str] | None = None, training_labels: bool = True) -> ClassificationData:
    """Labels are the given names, or the sorted distinct values. For training data every label needs
    examples; eval data (training_labels=False) may only use labels the training data has."""
    texts = [str(t) for t in _column(records, text_field, source)]
    values = [str(v) for v in _column(records, label_field, source)]
    names = list(label_names) if label_names else sorted(set(values))
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = f"the given labels {names}" if training_labels else "the training data"
        raise DataError(f"{source}: labels {unknown} never occur in {where}")
    empty = [n for n in names if n not in set(values)]
    if training_labels and empty:
        raise DataError(f"{source}: labels {empty} have no examples")
    if len(names) < 2:
        raise DataError(f"{source}: classification needs at least 2 labels, found {names}")
    index = {n: i for i, n in enumerate(names)}
    return ClassificationData(texts, [index[v] for v in values], names)


def generation_data(records: list[dict], source: str, prompt_field: str = "prompt",
                    completion_field: str = "completion", messages_field: str = "messages") -> GenerationData:
    if any(messages_field in r for r in records):
        prompts, completions = [], []
        for number, messages in enumerate(_column(records, messages_field, source), start=1):
            if (not isinstance(messages, list) or len(messages) < 2
                    or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)
                    or messages[-1]["role"] != "assistant"):
                raise DataError(f"{source}: row {number}: {messages_field} must be a list of "
                                "{role, content} turns ending with the assistant's")
            prompts.append(messages[:-1])
            completions.append(str(messages[-1]["content"]))
        return GenerationData(prompts, completions)
    return GenerationData([str(p) for p in _column(records, prompt_field, source)],
                          [str(c) for c in _column(records, completion_field, source)])


def split(data, eval_fraction: float, seed: int):
    """A held-out split; stratified by label for classification, so every label is in both parts."""
    rng = random.Random(seed)
    if isinstance(data, ClassificationData):
        train, held = [], []
        for label in range(len(data.label_names)):
            rows = [i for i, y in enumerate(data.labels) if y == label]
            rng.shuffle(rows)
            cut = max(1, round(len(rows) * eval_fraction)) if len(rows) > 1 else 0
            held += rows[:cut]
            train += rows[cut:]
    else:
        rows = list(range(len(data)))
        rng.shuffle(rows)
        cut = max(1, round(len(rows) * eval_fraction))
        held, train = rows[:cut], rows[cut:]
    if not train or not held:
        raise DataError(f"{len(data)} rows are too few to hold out an eval split; add rows or give --eval-data")
    return data.subset(sorted(train)), data.subset(sorted(held))
