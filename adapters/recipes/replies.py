"""Short conversational replies from `chatterbot-corpus` (English), trained as chat turns.

    pip install --no-deps chatterbot-corpus && python adapters/recipes/replies.py [--store DIR]

Every conversation in the corpus's YAML files gives (user, assistant) pairs of consecutive turns,
rendered with the base's chat template; the loss is on the reply only. Held-out pairs never share
a prompt with training pairs. Quality: held-out perplexity of the replies, adapter against base.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from recipe import parser, run


def _scalars(node) -> list[str]:
    return [str(x).strip() for x in node if isinstance(x, (str, int, float)) and str(x).strip()]


def load_pairs() -> list[tuple[str, str]]:
    import yaml  # ships with transformers' dependencies

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise SystemExit("the replies data ships in `chatterbot-corpus`: pip install --no-deps chatterbot-corpus")
    pairs = []
    for path in sorted((Path(spec.submodule_search_locations[0]) / "data" / "english").glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = _scalars(conversation)
            pairs += list(zip(turns, turns[1:], strict=False))
    return list(dict.fromkeys(pairs))


def main() -> None:
    args = parser(__doc__, "replies").parse_args()
    pairs = load_pairs()
    prompts = sorted({p for p, _ in pairs})
    random.Random(args.seed).shuffle(prompts)
    held_prompts = set(prompts[: len(prompts) // 10])

    def row(prompt: str, reply: str) -> dict:
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}

    train_rows = [row(p, r) for p, r in pairs if p not in held_prompts]
    held = [row(p, r) for p, r in pairs if p in held_prompts]
    run(args, train_rows, held, task="generation", rank=16, alpha=32, learning_rate=1e-3, warmup=0.1, epochs=1,
        batch_size=16, max_length=128)


if __name__ == "__main__":
    main()
