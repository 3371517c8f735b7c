"""Train/serve parity: the served adapters' accuracy on their held-out rows, through the SDK, against
the accuracy the trainer recorded in the manifest; with the base as trained (bf16) and as nf4.

    python adapters/recipes/parity.py --store DIR [--adapters sentiment topic] [--quantize none nf4]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from loraplex import Client, LoraplexError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_accuracy(store: str, names: list[str], trained: Path, quantize: str) -> dict[str, dict]:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "loraplex_server.app.serve", "--adapter-dir", store, "--port",
                               str(port), "--metrics-port", "0", "--quantize", quantize],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Client(f"127.0.0.1:{port}", timeout=600, retries=0) as client:
            for _ in range(600):
                try:
                    if client.health() == "SERVING":
                        break
                except LoraplexError:
                    pass  # not listening yet
                time.sleep(0.5)
            else:
                raise SystemExit("the server did not become healthy in 5 minutes")
            result = {}
            for name in names:
                rows = [json.loads(line) for line in (trained / name / "data" / "eval.jsonl").open(encoding="utf-8")]
                labels = []
                for start in range(0, len(rows), 64):
                    labels += [c.label for c in client.classify([r["text"] for r in rows[start:start + 64]],
                                                                adapter=name)]
                accuracy = sum(p == r["label"] for p, r in zip(labels, rows, strict=True)) / len(rows)
                trainer = client.adapters.get(name).manifest["metrics"]["after"]["accuracy"]
                result[name] = {"served": accuracy, "trainer": trainer, "points": 100 * (accuracy - trainer)}
            return result
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--trained", default="adapters/trained", help="the recipes' work folders")
    parser.add_argument("--adapters", nargs="+", default=["sentiment", "topic"])
    parser.add_argument("--quantize", nargs="+", default=["none", "nf4"])
    args = parser.parse_args()
    for quantize in args.quantize:
        for name, r in served_accuracy(args.store, args.adapters, Path(args.trained), quantize).items():
            print(json.dumps({"adapter": name, "quantize": quantize, **{k: round(v, 4) for k, v in r.items()}}))


if __name__ == "__main__":
    main()
