"""Over real gRPC, a server whose KV cache holds 112 tokens: a prompt that can never fit is refused at
once, concurrent generations that together need far more wait or are preempted and all finish with
the tokens they get alone, and the metrics show the cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from server_process import free_port, start_server
from test_grpc_service import CLS, GEN, sample, scrape

from loraplex import InvalidArgument

# The tiny Llama keeps 2 layers x 2 KV heads x 16 dims x (K, V) x fp32 = 512 bytes per token.
KV_BYTES = 112 * 512
PROMPTS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
           "adapters share one frozen base model", "great movie, awful plot", "stop here. stop there."]


@pytest.fixture(scope="module")
def small_kv_server(tiny, adapter_dir):
    base_dir, _ = tiny("llama")
    metrics_port = free_port()
    process, client = start_server(base_dir, adapter_dir, free_port(), metrics_port,
                                   extra_args=("--kv-cache-memory", str(KV_BYTES), "--max-batch-tokens", "8"))
    yield client, metrics_port
    client.close()
    process.kill()
    process.wait()


def test_a_prompt_that_can_never_fit_is_invalid_argument(small_kv_server):
    client, _ = small_kv_server
    with pytest.raises(InvalidArgument, match="never fit the KV cache of 112 tokens"):
        client.generate("the quick brown fox " * 6, adapter=GEN, max_tokens=100)
    assert client.generate("hello", adapter=GEN, max_tokens=4).completion_tokens == 4


def test_generations_beyond_the_cache_queue_and_finish_as_alone(small_kv_server):
    client, metrics_port = small_kv_server
    work = [(PROMPTS[i % len(PROMPTS)], GEN if i % 2 else None, 30 + 5 * (i % 4)) for i in range(10)]
    alone = [client.generate(p, adapter=a, max_tokens=n, temperature=0).token_ids for p, a, n in work]
    with ThreadPoolExecutor(len(work)) as pool:
        futures = [pool.submit(client.generate, p, adapter=a, max_tokens=n, temperature=0) for p, a, n in work]
        texts = [client.classify(["great movie"], adapter=CLS)[0].label for _ in range(3)]
        together = [f.result().token_ids for f in futures]
    assert together == alone
    assert len(set(texts)) == 1
    samples = scrape(metrics_port)
    free, used = sample(samples, "loraplex_kv_cache_blocks", state="free"), sample(samples, "loraplex_kv_cache_blocks",
                                                                                  state="used")
    assert free + used == 112 // 16 and used == 0
    assert sample(samples, "loraplex_step_tokens_count") > 0
    assert sample(samples, "loraplex_kv_waiting_rows") == 0
    assert sample(samples, "loraplex_kv_preemptions_total") > 0
    assert 0 < sample(samples, "loraplex_kv_cache_touched_bytes") <= KV_BYTES
