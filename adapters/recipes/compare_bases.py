"""The encoder adapters (encoder.py, MiniLM) against the shipped SmolLM2 ones (sentiment.py, topic.py): held-out
accuracy on the same rows, and classify throughput through two real servers, one per base, on the same texts.

    python adapters/recipes/compare_bases.py --minilm-store DIR   # the store encoder.py published into

The SmolLM2 server gets a fresh store holding the shipped example adapters. Throughput is measured in
alternating rounds (SmolLM2, MiniLM, SmolLM2, MiniLM, ...) so that a shared machine's load hits both
alike; each round classifies the sentiment held-out tweets (or the first --throughput-texts of them, shuffled),
64 texts a request.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import socket
import subprocess
import sys
import tempfile
import time

import sentiment
from encoder import RECIPES, minilm_path
from recipe import balanced_split

from loraplex import Client, LoraplexError
from loraplex_adapters.embedded_base import embedded_default_path
from loraplex_adapters.examples import publish_examples
from loraplex_adapters.fingerprint import model_fingerprint
from loraplex_adapters.store import AdapterStore

REQUEST_ROWS = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(base: str | None, store: str) -> tuple[subprocess.Popen, Client]:
    port = _free_port()
    command = [sys.executable, "-m", "loraplex_server.app.serve", "--adapter-dir", store, "--port", str(port),
               "--metrics-port", "0", "--http-port", "0", "--no-examples"] + (["--base", base] if base else [])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = Client(f"127.0.0.1:{port}", timeout=900, retries=0)
    for _ in range(1200):
        try:
            if client.health() == "SERVING":
                return server, client
        except LoraplexError:
            pass  # not listening yet
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"the server on {base or 'the embedded base'} did not become healthy in 10 minutes")


def classify(client: Client, adapter: str, texts: list[str]) -> list[str]:
    labels = []
    for start_row in range(0, len(texts), REQUEST_ROWS):
        labels += [c.label for c in client.classify(texts[start_row:start_row + REQUEST_ROWS], adapter=adapter)]
    return labels


def held_out_sets(seed: int) -> dict[str, tuple[str, list[dict]]]:
    """{set name: (task, rows)}: the recipes' own held-out rows (same seed), and the everyday sentences."""
    sets = {}
    for task, (load_rows, per_class, held_per_class, _) in RECIPES.items():
        sets[f"{task} held-out"] = (task, balanced_split(load_rows(), per_class, held_per_class, seed)[1])
    with open(sentiment.EVERYDAY, encoding="utf-8") as f:
        sets["sentiment everyday"] = ("sentiment", list(csv.DictReader(f)))
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minilm-store", required=True, help="the store holding sentiment-minilm and topic-minilm")
    parser.add_argument("--suffix", default="minilm", help="the encoder adapters' name suffix (encoder.py --name)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating throughput rounds")
    parser.add_argument("--throughput-texts", type=int, default=600,
                        help="sentiment held-out tweets classified per round (at most the 600 there are)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sets = held_out_sets(args.seed)
    with tempfile.TemporaryDirectory() as decoder_store:
        publish_examples(AdapterStore(decoder_store), model_fingerprint(embedded_default_path()))
        bases: dict[str, tuple[subprocess.Popen, Client]] = {}
        adapters = {"SmolLM2-135M": {t: t for t in RECIPES}, "MiniLM-L6": {t: f"{t}-{args.suffix}" for t in RECIPES}}
        try:
            bases["SmolLM2-135M"] = start(None, decoder_store)
            bases["MiniLM-L6"] = start(minilm_path(), args.minilm_store)
            for base, (_, client) in bases.items():
                for set_name, (task, rows) in sets.items():
                    labels = classify(client, adapters[base][task], [r["text"] for r in rows])
                    accuracy = sum(p == r["label"] for p, r in zip(labels, rows, strict=True)) / len(rows)
                    print(json.dumps({"base": base, "set": set_name, "rows": len(rows),
                                      "accuracy": round(accuracy, 4)}))
            texts = [r["text"] for r in sets["sentiment held-out"][1]]
            random.Random(args.seed).shuffle(texts)
            texts = texts[:args.throughput_texts]
            for round_number in range(1, args.rounds + 1):
                rates = {}
                for base, (_, client) in bases.items():
                    started = time.perf_counter()
                    classify(client, adapters[base]["sentiment"], texts)
                    rates[base] = len(texts) / (time.perf_counter() - started)
                print(json.dumps({"round": round_number, "texts": len(texts), "request_rows": REQUEST_ROWS,
                                  **{f"{b} texts/s": round(r, 1) for b, r in rates.items()},
                                  "MiniLM / SmolLM2": round(rates["MiniLM-L6"] / rates["SmolLM2-135M"], 2)}))
        finally:
            for server, client in bases.values():
                client.close()
                server.terminate()
                server.wait(timeout=60)


if __name__ == "__main__":
    main()
