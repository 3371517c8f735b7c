import os
import sys
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Servers started by tests (they inherit this) keep the HTTP API off unless a test passes --http-port:
# several run at once, and the default port 8000 would collide.
os.environ.setdefault("LORAPLEX_HTTP_PORT", "0")
# Where the tests run on the CPU, Triton (if installed) runs tests/test_triton_lora.py's kernels in its
# interpreter; it reads this when first imported, which the imports below may already do.
if os.environ.get("LORAPLEX_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loraplex.cli import main as cli_main  # noqa: E402
from tiny_models import BERT_ADAPTERS, GPT2_ADAPTERS, LLAMA_ADAPTERS, make_adapter, make_base  # noqa: E402

SPECS = {"llama": LLAMA_ADAPTERS, "gpt2": GPT2_ADAPTERS, "bert": BERT_ADAPTERS}


@pytest.fixture(scope="session")
def ops():
    """Our compiled CPU ops (cpu_ops.py); their own tests skip where no C++ toolchain builds them (the plain
    torch path they replace is tested everywhere)."""
    from loraplex_server.cpu_ops import cpu_ops

    compiled = cpu_ops()
    if compiled is None:
        pytest.skip("no C++ toolchain: the torch path is used and tested elsewhere")
    return compiled


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch) -> (base_dir, {adapter_name: (folder, spec)}), built once per session."""
    built = {}

    def get(arch: str):
        if arch not in built:
            root = tmp_path_factory.mktemp(arch)
            base = make_base(root / "base", arch)
            adapters = {}
            for seed, spec in enumerate(SPECS[arch], start=1):
                adapters[spec.name] = (make_adapter(base, root / spec.name, spec, seed), spec)
            built[arch] = (base, adapters)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def adapter_dir(tiny, tmp_path_factory):
    """A store holding the tiny Llama adapters, published twice each (so the latest is version 2),
    through the real `loraplex adapters publish` command."""
    base, adapters = tiny("llama")
    root = tmp_path_factory.mktemp("store")
    for name, (folder, spec) in adapters.items():
        labels = ",".join(f"{name}-{i}" for i in range(spec.num_labels))
        for _ in range(2):
            assert cli_main(["adapters", "publish", str(folder), "--name", name, "--store", str(root),
                             "--labels", labels, "--base", str(base)]) == 0
    return root


@pytest.fixture(scope="module")
def api(server):
    """The `openai` package's client of the module's `server` (a server_process.serving_with_http dict)."""
    with openai.OpenAI(base_url=server["url"] + "/v1", api_key=server["api_key"], max_retries=0, timeout=60) as client:
        yield client
