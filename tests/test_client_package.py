"""The client SDK's own guarantees: stubs match the .proto files, and no torch import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loraplex.protos import PROTO_FILES, generate

ROOT = Path(__file__).resolve().parents[1]


def test_committed_stubs_match_the_protos(tmp_path):
    generate(ROOT / "protos", tmp_path)
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            fresh = (tmp_path / f"{stem}{suffix}").read_text()
            committed = (ROOT / "clients" / "python" / f"{stem}{suffix}").read_text()
            assert fresh == committed, f"{stem}{suffix} drifted from {proto}: run `python -m loraplex.protos`"


def test_client_imports_without_torch():
    code = "import sys, loraplex, loraplex.cli; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
