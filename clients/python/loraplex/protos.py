"""Regenerate the committed stubs from protos/ (`python -m loraplex.protos`); tests check they match."""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_FILES = ["loraplex/v1/inference.proto", "loraplex/v1/adapters.proto", "loraplex/oip/grpc_predict_v2.proto"]


def generate(proto_root: Path, out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # a build-time tool, only in the `test` extra

    include = Path(grpc_tools.__file__).parent / "_proto"
    for proto in PROTO_FILES:
        code = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out_dir}",
                            f"--grpc_python_out={out_dir}", str(proto_root / proto)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto}")


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[3]
    generate(root / "protos", root / "clients" / "python")
    sys.exit(0)
