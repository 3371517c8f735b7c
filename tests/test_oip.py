"""KServe's Open Inference Protocol with the unmodified tritonclient: oip_tritonclient_cases.py, run in a pytest
process of its own. tritonclient's stubs and ours (loraplex.oip) share the protobuf package `inference` and
cannot load in one process, and this one loads ours whenever it runs a server in process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("oip_tritonclient_cases.py")


def test_open_inference_protocol_with_tritonclient():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                            capture_output=True, text=True, timeout=900, cwd=CASES.parent.parent)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
