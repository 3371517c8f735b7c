"""`loraplex train` on a tiny model: it learns, PEFT loads the output, a server serves the trainer's own
predictions, runs resume and repeat exactly, and bad data fails before any training."""

from __future__ import annotations

import json
import random

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from server_process import free_port, start_server
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from loraplex.cli import main as cli_main
from loraplex_adapters.store import AdapterStore
from loraplex_adapters.trainer import TrainConfig, load_data, train
from loraplex_adapters.training_data import DataError

POSITIVE = ["great", "lovely", "fine", "hello", "thanks"]
NEGATIVE = ["awful", "lazy", "stop", "end", "dog"]
FILLER = ["the", "movie", "plot", "music", "story", "today", "world"]


def sentences(seed: int, count: int) -> list[dict]:
    """Two labels the words decide, with filler words around them."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(tmp_path, base, **overrides) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    defaults = dict(task="classification", data=write_jsonl(tmp_path / "train.jsonl", sentences(0, 160)),
                    output=str(tmp_path / "out"), name="tiny-sentiment", base=str(base), rank=4, alpha=8,
                    learning_rate=3e-3, epochs=4, batch_size=16, dtype="float32", eval_fraction=0.25, dropout=0.0)
    return TrainConfig(**{**defaults, **overrides})


def test_classification_learns_loads_in_peft_and_serves_the_trainers_predictions(tiny, tmp_path):
    base, _ = tiny("llama")
    eval_rows = sentences(1, 40)
    # Training truncates to max_length; evaluation must not, or it would not see what a server sees.
    # A second held-out set, the same texts with the labels swapped: scored with the kept weights, it must
    # come out at exactly 1 - the held-out accuracy.
    flipped = [{"text": r["text"], "label": {"neg": "pos", "pos": "neg"}[r["label"]]} for r in eval_rows]
    cfg = config(tmp_path, base, eval_data=write_jsonl(tmp_path / "eval.jsonl", eval_rows), max_length=7,
                 extra_eval={"flipped": write_jsonl(tmp_path / "flipped.jsonl", flipped)})
    result = train(cfg, progress=False)
    assert result.held_out["flipped"]["accuracy"] == pytest.approx(1 - result.after["accuracy"])
    assert result.manifest.extra["metrics"]["held_out"] == result.held_out
    assert result.after["accuracy"] >= 0.9 > result.before["accuracy"]
    assert result.manifest.labels == ["neg", "pos"]
    assert result.manifest.extra["metrics"]["training"]["data_sha256"].startswith("sha256:")

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_model = PeftModel.from_pretrained(model, result.output).eval()
    texts = [r["text"] for r in eval_rows]
    with torch.no_grad():
        peft_labels = [["neg", "pos"][int(peft_model(**tokenizer(t, return_tensors="pt")).logits.argmax())]
                       for t in texts]
    peft_accuracy = sum(p == r["label"] for p, r in zip(peft_labels, eval_rows, strict=True)) / len(eval_rows)
    assert peft_accuracy == pytest.approx(result.after["accuracy"])

    store, port = tmp_path / "store", free_port()
    AdapterStore(store)
    process, client = start_server(base, store, port)
    try:
        assert cli_main(["train", "classification", "--data", cfg.data, "--eval-data", cfg.eval_data, "--output",
                         str(tmp_path / "cli-out"), "--name", "served", "--base", str(base), "--rank", "4",
                         "--alpha", "8", "--learning-rate", "3e-3", "--epochs", "4", "--dtype", "float32",
                         "--dropout", "0", "--max-length", "7", "--no-progress", "--register",
                         f"127.0.0.1:{port}"]) == 0
        served = [r.label for r in client.classify(texts, adapter="served")]
        info = client.adapters.get("served")
    finally:
        client.close()
        process.kill()
        process.wait()
    assert served == peft_labels  # same data, seed and settings: the same adapter, served
    assert info.manifest["metrics"]["after"]["accuracy"] == pytest.approx(peft_accuracy)


def test_generation_lowers_held_out_perplexity(tiny, tmp_path):
    base, _ = tiny("llama")
    rows = [{"prompt": f"hello world, {w}", "completion": " how are you today? fine thanks"} for w in FILLER * 6]
    result = train(config(tmp_path, base, task="generation", data=write_jsonl(tmp_path / "gen.jsonl", rows),
                          epochs=10), progress=False)
    assert result.after["perplexity"] < result.before["perplexity"] / 2
    tensors = load_file(result.output / "adapter_model.safetensors")
    assert any("lora_A" in k for k in tensors) and not any("score" in k for k in tensors)


def test_resume_continues_to_the_same_weights_and_seeded_runs_repeat(tiny, tmp_path):
    base, _ = tiny("llama")
    straight = train(config(tmp_path / "a", base, epochs=3, dropout=0.1), progress=False)
    interrupted = train(config(tmp_path / "b", base, epochs=3, dropout=0.1), progress=False)
    (interrupted.output.parent / "checkpoint" / "epoch-3.pt").unlink()  # as if it died during epoch 3
    resumed = train(config(tmp_path / "b", base, epochs=3, dropout=0.1, resume=True), progress=False)
    again = train(config(tmp_path / "c", base, epochs=3, dropout=0.1), progress=False)
    weights = [load_file(r.output / "adapter_model.safetensors") for r in (straight, resumed, again)]
    for other in weights[1:]:
        assert weights[0].keys() == other.keys()
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    with pytest.raises(DataError, match="other settings"):
        train(config(tmp_path / "b", base, epochs=3, dropout=0.2, resume=True), progress=False)


@pytest.mark.parametrize(("rows", "overrides", "message"), [
    ([{"text": "a", "stars": "pos"}], {}, "no column 'label' (columns: stars, text)"),
    ([], {}, "no rows"),
    (sentences(0, 8), {"labels": ["neg", "pos", "neutral"]}, "labels ['neutral'] have no examples"),
    ([{"text": "a", "label": "x"}] * 4, {}, "at least 2 labels"),
    (sentences(0, 8), {"eval_rows": [{"text": "a", "label": "meh"}]}, "labels ['meh'] never occur in the training"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], {"task": "generation"}, "ending with the assistant's"),
    ([{"prompt": "hi"}], {"task": "generation"}, "no column 'completion'"),
])
def test_bad_data_fails_before_training(tmp_path, rows, overrides, message):
    eval_rows = overrides.pop("eval_rows", None)
    cfg = TrainConfig(task=overrides.pop("task", "classification"), data=write_jsonl(tmp_path / "d.jsonl", rows),
                      output=str(tmp_path / "out"), **overrides)
    if eval_rows:
        cfg.eval_data = write_jsonl(tmp_path / "e.jsonl", eval_rows)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_data(cfg)


def test_unreadable_encoding_and_the_cli_error(tmp_path, capsys):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,pos\n".encode("latin-1"))
    assert cli_main(["train", "classification", "--data", str(path), "--output", str(tmp_path / "o")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was trained or written
