"""The example adapters shipped in `loraplex_adapters/example_adapters/`: write them from a store the
recipes trained into, or check a fresh training run against them.

    python adapters/recipes/shipped.py write --store DIR   # copy the latest versions, weights in bf16
    python adapters/recipes/shipped.py check --store DIR   # metrics within noise of the shipped ones?

Shipped weights are bf16, half of the trainer's fp32: the server computes the LoRA delta in bf16 on
GPUs and native-bf16 CPUs anyway, and on other CPUs the rounding moves scores by well under 0.01.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

from loraplex_adapters.examples import EXAMPLE_NAMES, EXAMPLES_DIR, example_manifests
from loraplex_adapters.manifest import Manifest, write_manifest
from loraplex_adapters.store import AdapterStore

WEIGHTS = "adapter_model.safetensors"
# Two binomial standard errors of accuracy on the 200-600 held-out rows are 3-6 points; seeds alone
# move the figures that much.
ACCURACY_TOLERANCE = 0.06
PERPLEXITY_TOLERANCE = 0.10  # relative


def write(store: AdapterStore) -> None:
    EXAMPLES_DIR.mkdir(exist_ok=True)
    for name in EXAMPLE_NAMES:
        manifest, folder = store.resolve(name)
        target = EXAMPLES_DIR / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        shutil.copyfile(folder / "adapter_config.json", target / "adapter_config.json")
        weights = load_file(folder / WEIGHTS)
        save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, target / WEIGHTS, metadata={"format": "pt"})
        shipped = Manifest(name=name, labels=manifest.labels,
                           extra={k: manifest.extra[k] for k in ("task", "base_fingerprint", "metrics")})
        write_manifest(target, shipped)
        print(f"{name}@{manifest.version} -> {target} ({(target / WEIGHTS).stat().st_size} bytes)")


def _headline(metrics: dict) -> dict[str, float]:
    """The figures compared: held-out accuracy (or perplexity), and any extra held-out set's accuracy."""
    after = metrics["after"]
    figures = {"accuracy": after["accuracy"]} if "accuracy" in after else {"perplexity": after["perplexity"]}
    for name, result in metrics.get("held_out", {}).items():
        figures[f"{name} accuracy"] = result["accuracy"]
    return figures


def _within(figure: str, trained: float, shipped: float) -> bool:
    if figure == "perplexity":
        return abs(trained - shipped) <= PERPLEXITY_TOLERANCE * shipped
    return abs(trained - shipped) <= ACCURACY_TOLERANCE


def check(store: AdapterStore) -> int:
    failures = 0
    for _, shipped in example_manifests():
        trained = store.lookup(shipped.name)
        for figure, value in _headline(shipped.extra["metrics"]).items():
            new = _headline(trained.extra["metrics"]).get(figure)
            ok = new is not None and _within(figure, new, value)
            failures += not ok
            print(json.dumps({"adapter": shipped.name, "figure": figure, "shipped": round(value, 4),
                              "trained": None if new is None else round(new, 4), "within_noise": ok}))
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["write", "check"])
    parser.add_argument("--store", required=True, help="the store the recipes published into")
    args = parser.parse_args()
    store = AdapterStore(args.store)
    if args.action == "write":
        write(store)
        return 0
    return check(store)


if __name__ == "__main__":
    sys.exit(main())
