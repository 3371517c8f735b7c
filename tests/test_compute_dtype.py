"""`--dtype auto` follows the hardware: bf16 where it is native (CUDA, AVX512-BF16, AMX), fp32 elsewhere."""

from __future__ import annotations

import pytest
import torch

from loraplex_adapters.compute_dtype import auto_dtype, cpu_description, native_bf16
from loraplex_server.engine.base_model import BaseModelError, resolve_dtype

CPU = torch.device("cpu")


def fake_cpu(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (True, True, torch.bfloat16),
    (False, False, torch.float32),
])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    fake_cpu(monkeypatch, avx512_bf16, amx)
    assert native_bf16(CPU) == (expected == torch.bfloat16)
    assert auto_dtype(CPU) == expected
    assert resolve_dtype("auto", CPU) == expected


def test_missing_probes_mean_no_native_bf16(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert auto_dtype(CPU) == torch.float32
    assert "avx512_bf16 no, amx no" in cpu_description()


def test_cuda_is_bf16_without_probing_the_cpu(monkeypatch):
    def probe():
        raise AssertionError("the CPU was probed for a CUDA device")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", probe, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", probe, raising=False)
    assert native_bf16(torch.device("cuda"))
    assert auto_dtype(torch.device("cuda:0")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("avx512_bf16", [True, False])
@pytest.mark.parametrize(("name", "expected"), [
    ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32),
])
def test_explicit_dtype_is_kept(monkeypatch, avx512_bf16, name, expected):
    fake_cpu(monkeypatch, avx512_bf16, avx512_bf16)
    assert resolve_dtype(name, CPU) == expected


def test_unknown_dtype_is_refused():
    with pytest.raises(BaseModelError, match="unknown dtype 'float64'"):
        resolve_dtype("float64", CPU)


def test_cpu_description_names_the_flags(monkeypatch):
    fake_cpu(monkeypatch, False, True)
    line = cpu_description()
    assert line.startswith(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, ")
    assert "avx512_bf16 no, amx yes" in line and line.endswith(f"{torch.get_num_threads()} threads")
