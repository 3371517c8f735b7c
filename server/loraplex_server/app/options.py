"""The options of `loraplex serve`, shared by the single-node server and each Ray Serve replica (which must not
import the server's front ends). Every option has an environment variable (LORAPLEX_<OPTION>); the command
line wins."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from loraplex_adapters.help_format import HelpFormatter

# engine/base_model.py's, repeated so that parsing options imports no torch (tests check they agree)
QUANTIZE_CHOICES = ("auto", "nf4", "int8", "none")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'512M', '1G', '2GiB', '1048576' -> bytes (binary units)."""
    value = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        number = math.nan
    if not 0 <= number * _UNITS[unit] < 1 << 63:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512M, 2G, 1048576)")
    return int(number * _UNITS[unit])


def non_negative(text: str) -> int:
    """An integer flag where 0 means the default."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = the default), got {value}")
    return value


def default_adapter_dir() -> str:
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return str(Path(data) / "loraplex" / "adapters")


def _env(name: str, default):
    return os.environ.get(f"LORAPLEX_{name.upper()}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex serve", formatter_class=HelpFormatter, description=(
        "Serve LoRA adapters of one base model: our gRPC API and KServe's Open Inference Protocol on --port, the "
        "OpenAI-compatible HTTP API on --http-port, Prometheus metrics on --metrics-port."))
    parser.add_argument("--base", default=_env("base", None),
                        help="local Hugging Face model folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--quantize", default=_env("quantize", "auto"), choices=QUANTIZE_CHOICES,
                        help="base weights: nf4 or int8 (bitsandbytes) or none; auto = nf4 on CUDA, none on CPU")
    parser.add_argument("--dtype", default=_env("dtype", "auto"), choices=DTYPE_CHOICES,
                        help="compute dtype; auto = bfloat16 on CUDA and on CPUs with native bf16, else float32")
    parser.add_argument("--device", default=_env("device", "auto"), help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--embed-pooling", default=_env("embed_pooling", None), choices=("mean", "last", "cls"),
                        help="how /v1/embeddings and Embed pool the base's last hidden states (default: the "
                             "model's sentence-transformers config, else mean on an encoder, last token on a "
                             "decoder)")
    parser.add_argument("--embed-normalize", action=argparse.BooleanOptionalAction,
                        default={"1": True, "0": False}.get(_env("embed_normalize", "")),
                        help="L2-normalize embeddings (default: as the model's sentence-transformers config "
                             "says, else yes)")
    parser.add_argument("--host", default=_env("host", "127.0.0.1"),
                        help="address the gRPC and HTTP APIs bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=int(_env("port", 50051)),
                        help="gRPC port: our API, KServe's Open Inference Protocol, health checking, reflection")
    parser.add_argument("--metrics-port", type=int, default=int(_env("metrics_port", 9400)),
                        help="Prometheus metrics on --metrics-host, over HTTPS when --tls-cert is set; 0 turns "
                             "it off")
    parser.add_argument("--metrics-host", default=_env("metrics_host", None),
                        help="address the metrics endpoint binds (default: --host)")
    parser.add_argument("--http-port", type=int, default=int(_env("http_port", 8000)),
                        help="the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
                             "/v1/embeddings, /classify, /health, /metrics) on --host; 0 turns it off")
    parser.add_argument("--adapter-dir", default=_env("adapter_dir", default_adapter_dir()),
                        help="the adapter store: uploads go here, requests load from here")
    parser.add_argument("--adapter-store", default=_env("adapter_store", None),
                        help="the adapter store as a folder or s3://bucket/prefix, shared by every replica (boto3 "
                             "reads endpoint, region and credentials the usual AWS way: AWS_ENDPOINT_URL, "
                             "AWS_REGION, AWS_ACCESS_KEY_ID...); overrides --adapter-dir (default: none: "
                             "--adapter-dir is the store)")
    parser.add_argument("--no-examples", action="store_true", default=bool(_env("no_examples", "")),
                        help="do not publish the shipped example adapters (sentiment, topic, replies) when the "
                             "default --adapter-dir is created on the first start")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        default=bool(_env("allow_base_mismatch", "")),
                        help="serve adapters whose manifest names another base model fingerprint")
    parser.add_argument("--max-adapters", type=int, default=int(_env("max_adapters", 1024)),
                        help="most adapters on the device at once (slot tables grow to it as adapters arrive; "
                             "--adapter-memory bounds the bytes)")
    parser.add_argument("--adapter-memory", type=parse_bytes, default=_env("adapter_memory", "1G"),
                        help="device bytes for adapter weights; least recently used idle adapters are evicted")
    parser.add_argument("--host-adapter-memory", type=parse_bytes, default=_env("host_adapter_memory", "4G"),
                        help="host bytes for adapters kept in memory, ready to swap into a slot")
    parser.add_argument("--max-rank", type=int, default=int(_env("max_rank", 256)),
                        help="uploads with a higher LoRA rank are refused")
    parser.add_argument("--max-upload-bytes", type=parse_bytes, default=_env("max_upload_bytes", "512M"),
                        help="uploads (and the adapters they unpack to) past this size are refused")
    parser.add_argument("--max-batch", type=int, default=int(_env("max_batch", 64)),
                        help="most rows (generations, classification texts) in one engine step")
    parser.add_argument("--max-batch-tokens", type=non_negative, default=_env("max_batch_tokens", "0"),
                        help="tokens per engine step: decode rows, prefill chunks and classification texts share "
                             "it, so a long prompt is prefilled in chunks while running rows keep decoding "
                             "(default: 128 on CPU, 2048 on CUDA)")
    parser.add_argument("--threads", type=non_negative, default=_env("threads", "0"),
                        help="CPU threads each engine step computes on (a CPU device). Default (0): steps of "
                             "under 8 tokens keep one CPU for the front ends and the event loop, whose work each "
                             "token wakes; larger steps take every thread (torch's count: OMP_NUM_THREADS or the "
                             "cores)")
    parser.add_argument("--kv-cache-memory", type=parse_bytes, default=_env("kv_cache_memory", "0") or None,
                        help="bytes of KV cache, allocated once; generations wait for room and are preempted "
                             "(then recomputed) when it runs out (default: enough for --max-batch rows at full "
                             "context, at most a quarter of free memory, or half of free GPU memory)")
    parser.add_argument("--max-pending", type=int, default=int(_env("max_pending", 256)),
                        help="requests waiting for the engine before new ones get RESOURCE_EXHAUSTED")
    parser.add_argument("--grace", type=float, default=float(_env("grace", 10.0)),
                        help="seconds in-flight requests get to finish on SIGTERM")
    parser.add_argument("--drain-delay", type=float, default=float(_env("drain_delay", 1.0)),
                        help="seconds health reports NOT_SERVING before the server stops taking requests on SIGTERM")
    parser.add_argument("--max-message-bytes", type=int, default=int(_env("max_message_bytes", 4 * 1024 * 1024)),
                        help="larger requests are refused with RESOURCE_EXHAUSTED")
    # The defaults are said in words: help must never print the tokens of the environment.
    parser.add_argument("--token", action="append", default=_split(_env("tokens", "")),
                        help="accepted bearer token, repeatable (default: $LORAPLEX_TOKENS, comma separated; none "
                             "means no authentication)")
    parser.add_argument("--admin-token", action="append", default=_split(_env("admin_tokens", "")),
                        help="bearer token for adapter management, repeatable (default: $LORAPLEX_ADMIN_TOKENS, "
                             "comma separated)")
    parser.add_argument("--tls-cert", default=_env("tls_cert", None),
                        help="PEM certificate chain: serve TLS (default: none, plain gRPC and HTTP)")
    parser.add_argument("--tls-key", default=_env("tls_key", None), help="PEM private key for --tls-cert "
                        "(default: none)")
    parser.add_argument("--access-log", action="store_true", default=bool(_env("access_log", "")),
                        help="log one line per request: method, adapter, status, milliseconds")
    parser.add_argument("--ray", action="store_true", default=bool(_env("ray", "")),
                        help="serve --replicas replicas on a local Ray cluster, through Ray Serve's gRPC proxy on "
                             "--port, routed by adapter (needs loraplex[cluster])")
    parser.add_argument("--replicas", type=int, default=int(_env("replicas", 2)), help="replicas with --ray")
    parser.epilog = ("Every option can also be set by an environment variable LORAPLEX_<OPTION> "
                     "(e.g. LORAPLEX_HTTP_PORT).")
    return parser


def _split(value: str) -> list[str]:
    return [item for item in value.split(",") if item]
