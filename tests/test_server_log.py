"""The server says what it does: uploads, loads, evictions and deletes at INFO, and one line per request
behind --access-log, with client text escaped so it cannot forge a line."""

from __future__ import annotations

import re
import time

import pytest
from server_process import free_port, start_server

from loraplex import InvalidArgument


def _wait_for(process, pattern: str, timeout: float = 30.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in list(process.output):
            if re.search(pattern, line):
                return line
        time.sleep(0.1)
    raise AssertionError(f"no log line matches {pattern!r}; last lines:\n{''.join(list(process.output)[-20:])}")


@pytest.mark.parametrize("access_log", [True, False])
def test_adapter_lifecycle_and_requests_are_logged(tiny, tmp_path, access_log):
    base, adapters = tiny("llama")
    folder, spec = adapters["cls3_r2"]
    process, client = start_server(base, tmp_path / "store", free_port(),
                                   extra_args=["--max-adapters", "1"] + (["--access-log"] if access_log else []),
                                   in_process=False)  # its log is what this test reads
    try:
        labels = [f"l{i}" for i in range(spec.num_labels)]
        # The startup log names every port (gRPC, HTTP, metrics); these two are off in this test.
        _wait_for(process, r"listening: gRPC \(ours, KServe OIP, health\) on 127\.0\.0\.1:\d+, "
                           r"HTTP \(OpenAI API\) off, metrics off")
        client.adapters.upload(folder, name="logged", labels=labels)
        client.adapters.upload(folder, name="other", labels=labels)
        _wait_for(process, r"published logged@1 \(classification, rank 2")
        client.classify(["hello"], adapter="logged")
        _wait_for(process, r"adapter logged@1 read from the store in \d+ ms")
        _wait_for(process, r"adapter logged@1 written into device slot")
        client.classify(["hello"], adapter="other")  # one slot for adapters: `logged` must leave
        _wait_for(process, r"adapter logged@1 left the device")
        with pytest.raises(InvalidArgument):
            client.classify(["hi"], adapter="nope\nINFO forged line")
        client.adapters.delete("logged")
        _wait_for(process, r"deleted logged version\(s\) 1")
        if access_log:
            _wait_for(process, r"Classify adapter='logged' status=OK [\d.]+ ms")
            line = _wait_for(process, r"Classify adapter='nope")
            assert "status=INVALID_ARGUMENT" in line and "\\n" in line  # escaped: still one line
        else:
            time.sleep(0.5)
            assert not any("loraplex.access" in line for line in process.output)
        assert not any(line.startswith("INFO forged") for line in process.output)
    finally:
        process.terminate()
        process.wait(timeout=60)
