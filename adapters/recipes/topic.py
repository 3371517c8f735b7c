"""Topic of a quote (computers / politics / science / art / food) from the Debian `fortunes` package.

    apt-get install fortunes && python adapters/recipes/topic.py [--store DIR]

Each category file holds quotes separated by lines with a single `%`; duplicates are dropped, and
training and held-out rows are balanced per category and never share a text.
"""

from __future__ import annotations

from pathlib import Path

from recipe import balanced_split, classification_parser, run, subsample

FORTUNES = Path("/usr/share/games/fortunes")
LABELS = ["art", "computers", "food", "politics", "science"]


def load_rows() -> list[dict]:
    if not FORTUNES.is_dir():
        raise SystemExit(f"no {FORTUNES}: install the Debian package `fortunes` (apt-get install fortunes)")
    rows, seen = [], set()
    for label in LABELS:
        text = (FORTUNES / label).read_text(encoding="utf-8", errors="replace")
        for quote in text.split("\n%\n"):
            quote = " ".join(quote.split())
            if 20 <= len(quote) and quote not in seen:
                seen.add(quote)
                rows.append({"text": quote, "label": label})
    return rows


def main() -> None:
    args = classification_parser(__doc__, "topic").parse_args()
    train_rows, held = balanced_split(load_rows(), 160, 40, args.seed)
    run(args, subsample(train_rows, args.per_class, args.seed), held,
        task="classification", labels=LABELS, rank=16, alpha=32, learning_rate=1e-3,
        warmup=0.1, epochs=2, batch_size=16, max_length=96)


if __name__ == "__main__":
    main()
