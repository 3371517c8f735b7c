"""Embeddings in the engine: pooled from the same step loop as classification and generation, on a decoder
(last-token or mean pooling) and an encoder (mean pooling), through an adapter's LoRA on the per-row slot
path; each checked against a direct Hugging Face / PEFT forward with the pooling computed here."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from server_process import free_port, start_server
from test_engine_vs_peft import reference_model, tensor
from transformers import AutoTokenizer

from loraplex_adapters.store import AdapterStore
from loraplex_server.api.metrics import Metrics
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.embedding import EmbedRequest
from loraplex_server.engine.engine import Engine, GenerationRequest
from loraplex_server.engine.pooling import Pooling, PoolingConfigError, pooling_of
from loraplex_server.engine.requests import ClassifyRequest
from loraplex_server.engine.sampling import SamplingParams
from loraplex_server.runtime.adapter_manager import AdapterManager
from loraplex_server.runtime.engine_loop import EngineLoop
from tiny_models import TEST_DEVICE

ROWS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [7, 7, 7, 7], [30]]


def engine_on(base_dir, adapters: dict, pooling: Pooling | None = None) -> Engine:
    engine = Engine(load_base_model(base_dir, quantize="none", dtype="float32", device=TEST_DEVICE), max_adapters=4,
                    pooling=pooling)
    for name, (folder, spec) in adapters.items():
        engine.load_adapter(name, folder, labels=[f"{name}-{i}" for i in range(spec.num_labels)] or None)
    return engine


def pooled(states: torch.Tensor, mode: str, normalize: bool = True) -> torch.Tensor:
    """states [tokens, hidden] of one text -> its embedding, computed the plain way."""
    vector = {"mean": states.mean(0), "last": states[-1], "cls": states[0]}[mode].float()
    return F.normalize(vector, dim=-1) if normalize else vector


def decoder_states(model, ids: list[int]) -> torch.Tensor:
    """The final-norm hidden states of a causal LM (PEFT-wrapped or not) for one text."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return inner.model(input_ids=tensor([ids])).last_hidden_state[0]


@pytest.mark.parametrize("mode,normalize", [("last", True), ("mean", True), ("mean", False)])
@torch.inference_mode()
def test_decoder_pooling_matches_hf_forward(tiny, mode, normalize):
    base_dir, _ = tiny("llama")
    engine = engine_on(base_dir, {}, Pooling(mode, normalize))
    got = engine.embed_ids(ROWS)
    reference = reference_model(base_dir, "none")
    for row, vector in zip(ROWS, got, strict=True):
        torch.testing.assert_close(vector, pooled(decoder_states(reference, row), mode, normalize),
                                   atol=1e-4, rtol=1e-4)
    if normalize:
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(ROWS)))


@torch.inference_mode()
def test_decoder_adapter_changes_embedding_and_matches_peft(tiny):
    base_dir, adapters = tiny("llama")
    chosen = {"gen_all_r8": adapters["gen_all_r8"], "cls3_r2": adapters["cls3_r2"]}
    engine = engine_on(base_dir, chosen)
    assert engine.runner.pooling == Pooling("last", True)  # a decoder without a sentence-transformers config
    base = engine.embed_ids(ROWS)
    for name, (folder, _spec) in chosen.items():
        got = engine.embed_ids(ROWS, name)
        assert (got - base).abs().max() > 1e-3, f"{name} did not change the embedding"
        peft = PeftModel.from_pretrained(reference_model(base_dir, "none"), folder).eval()
        for row, vector in zip(ROWS, got, strict=True):
            torch.testing.assert_close(vector, pooled(decoder_states(peft, row), "last"), atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_encoder_pooling_and_adapter_match_peft(tiny):
    base_dir, adapters = tiny("bert")
    folder, spec = adapters["cls3_qv"]
    engine = engine_on(base_dir, {"cls3_qv": adapters["cls3_qv"]})
    assert engine.runner.pooling == Pooling("mean", True)
    rows = [[3, *r, 4] for r in ROWS]  # [CLS] ... [SEP]
    base, adapted = engine.embed_ids(rows), engine.embed_ids(rows, "cls3_qv")
    assert (adapted - base).abs().max() > 1e-3
    plain = reference_model(base_dir, "none", encoder=True)
    peft = PeftModel.from_pretrained(reference_model(base_dir, "none", cls_labels=spec.num_labels), folder).eval()
    for row, b, a in zip(rows, base, adapted, strict=True):
        torch.testing.assert_close(b, pooled(plain(input_ids=tensor([row])).last_hidden_state[0], "mean"),
                                   atol=1e-4, rtol=1e-4)
        encoder = peft.get_base_model().bert
        torch.testing.assert_close(a, pooled(encoder(input_ids=tensor([row])).last_hidden_state[0], "mean"),
                                   atol=1e-4, rtol=1e-4)
    # One padded step of mixed rows: the adapter's texts, the base's, and a classification text.
    expected = engine.classify_ids([rows[0]], ["cls3_qv"])[0]
    requests = [EmbedRequest(rows, "cls3_qv"), EmbedRequest(rows)]
    for request in requests:
        engine.submit_embed(request)
    engine.submit_classify(ClassifyRequest([rows[0]], "cls3_qv"))
    output = engine.step()
    assert len(engine.last_step[0]) == 2 * len(rows) + 1 and len(output.classified) == 1
    assert output.classified[0].results[0].scores == pytest.approx(expected.scores, abs=1e-5)
    done = {e.request_id: e.results for e in output.embedded}
    torch.testing.assert_close(done[requests[0].request_id], adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(done[requests[1].request_id], base, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_every_kind_in_one_step(tiny):
    """Generation rows, classification texts and embedding texts on different adapters share a step, and
    each embedding is what it is alone."""
    base_dir, adapters = tiny("llama")
    engine = engine_on(base_dir, {k: adapters[k] for k in ("gen_qv_r4", "cls3_r2", "gen_all_r8")})
    alone = {name: engine.embed_ids(ROWS[:3], name) for name in ("gen_all_r8", None)}
    engine.submit(GenerationRequest([5, 6, 7], "gen_qv_r4", SamplingParams(max_new_tokens=3)))
    engine.submit_classify(ClassifyRequest([[8, 9, 10]], "cls3_r2"))
    requests = [EmbedRequest(ROWS[:3], "gen_all_r8"), EmbedRequest(ROWS[:3])]
    for request in requests:
        engine.submit_embed(request)
    output = engine.step()
    assert len(engine.last_step[0]) == 8  # 1 prompt, 1 classification text, 6 embedding texts: one forward
    assert len(output.events) == 1 and len(output.classified) == 1
    done = {e.request_id: e.results for e in output.embedded}
    assert set(done) == {r.request_id for r in requests}
    for request, name in zip(requests, ("gen_all_r8", None), strict=True):
        torch.testing.assert_close(done[request.request_id], alone[name], atol=1e-5, rtol=1e-5)


def test_cancelled_embedding_ends_with_an_error(tiny):
    base_dir, _ = tiny("llama")
    engine = engine_on(base_dir, {})
    request = EmbedRequest(ROWS)
    engine.submit_embed(request)
    engine.cancel(request.request_id)
    ended = engine.step().embedded
    assert [e.request_id for e in ended] == [request.request_id] and ended[0].error is not None
    assert not engine.has_work


def test_pooling_config(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text('[{"path": "", "type": "sentence_transformers.models.Transformer"},'
                                           '{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]')
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 77}')
    assert pooling_of(tmp_path, "encoder") == Pooling("cls", False, 77)  # no Normalize module
    assert pooling_of(tmp_path, "encoder", "mean", True) == Pooling("mean", True, 77)
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_max_tokens": true}')
    with pytest.raises(PoolingConfigError):
        pooling_of(tmp_path, "encoder")
    assert pooling_of(tmp_path, "encoder", "last").mode == "last"
    with pytest.raises(PoolingConfigError):
        pooling_of(tmp_path, "causal", "max")


@torch.inference_mode()
def test_serve_options_choose_the_pooling(tiny, adapter_dir):
    """`serve --embed-pooling mean --no-embed-normalize` reaches the engine: raw mean-pooled vectors."""
    base_dir, _ = tiny("llama")
    port = free_port()
    process, client = start_server(base_dir, adapter_dir, port,
                                   extra_args=["--embed-pooling", "mean", "--no-embed-normalize"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        texts = ["the quick brown fox", "hello world"]
        got = torch.tensor(client.embed(texts).vectors)
    finally:
        client.close()
        process.kill()
        process.wait()
    reference = reference_model(base_dir, "none")
    for text, vector in zip(texts, got, strict=True):
        expected = pooled(decoder_states(reference, tokenizer(text)["input_ids"]), "mean", normalize=False)
        torch.testing.assert_close(vector, expected.cpu(), atol=1e-4, rtol=1e-4)
    assert abs(got[0].norm() - 1) > 1e-3


def test_a_caller_that_leaves_takes_its_texts_out_of_the_engine(tiny, tmp_path):
    """Through the real engine loop and adapter manager: the embedding's caller is cancelled, and the next
    step ends its rows (hundreds of steps of texts were queued), its adapter's count returns to zero."""
    _, adapters = tiny("llama")
    store = AdapterStore(tmp_path / "store")
    store.publish(adapters["gen_qv_r4"][0], "gen")
    engine = engine_on(tiny("llama")[0], {})
    manager = AdapterManager(engine, store, 1 << 30, 1 << 30, Metrics())
    loop = EngineLoop(engine, manager, manager.metrics)
    loop.start()

    async def scenario():
        key = manager.resolve("gen")[0]
        alone = await loop.embed([ROWS[0]], key)
        task = asyncio.ensure_future(loop.embed([list(range(1, 101))] * 256, key))  # ~200 steps of 128 tokens
        while not await loop.call(engine.running_request_ids):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await loop.call(lambda: None)  # after the step that saw the cancel
        assert await loop.call(engine.running_request_ids) == []
        assert not await loop.call(lambda: engine.has_work)
        assert manager.snapshot()[key].in_flight == 0
        torch.testing.assert_close(await loop.embed([ROWS[0]], key), alone)
        assert loop.in_flight == 0
    try:
        asyncio.run(scenario())
    finally:
        loop.stop()
