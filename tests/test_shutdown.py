"""SIGTERM with a short grace: streams still running are cut, and the server exits quietly (no
CancelledError tracebacks in its log for each cut RPC)."""

from __future__ import annotations

import signal

import grpc
from server_process import free_port, start_server

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc


def test_sigterm_with_a_short_grace_cuts_streams_without_tracebacks(tiny, adapter_dir):
    port = free_port()
    process, client = start_server(tiny("llama")[0], adapter_dir, port,
                                   extra_args=["--grace", "0.1", "--drain-delay", "0"], in_process=False)
    client.close()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.InferenceServiceStub(channel)
    try:
        sampling = pb.SamplingParameters(max_tokens=120)
        streams = [stub.GenerateStream(pb.GenerateStreamRequest(prompt="hello world", adapter=adapter,
                                                                sampling=sampling), timeout=120)
                   for adapter in ("", "gen_qv_r4", "gen_all_r8", "", "gen_mlp_r2", "")]
        unary = [stub.Generate.future(pb.GenerateRequest(prompt="the quick brown fox", sampling=sampling), timeout=120)
                 for _ in range(2)]
        for stream in streams:
            assert next(stream).HasField("delta")  # running in the engine, not queued
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        process.output_reader.join(timeout=30)
        output = "".join(process.output)
        codes = [_end_of(stream) for stream in streams] + [_code_of(call) for call in unary]
    finally:
        channel.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "stopped" in output
    assert any(code != grpc.StatusCode.OK for code in codes), "every stream finished before the grace ended"
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
    assert "Traceback" not in output and "CancelledError" not in output, output


def _end_of(stream) -> grpc.StatusCode:
    try:
        for _ in stream:
            pass
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _code_of(call) -> grpc.StatusCode:
    try:
        call.result()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
