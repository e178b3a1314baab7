"""`system.echo` through `sdk.Client`, next to a bare gRPC echo measured in the same run.

.venv/bin/python -m benchmarks.echo
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import grpc

import sdk
from benchmarks.vault_and_gateway import measure
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from tests.helpers import REPO, Process, start_sidecar, wait_until

PAYLOAD = {"data": "x" * 88}  # 100 bytes of JSON


def main() -> None:
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        (tmp / "bare").mkdir(mode=0o700)
        bare_path = tmp / "bare" / "echo.sock"
        bare = Process(
            [sys.executable, "-m", "benchmarks.bare_server", str(bare_path)],
            tmp / "bare.log",
            cwd=REPO,
        )
        sidecar, target = start_sidecar(tmp, ["system"], '[logging]\nlevel = "info"\n')
        try:
            wait_until(bare_path.exists, 20, "the bare server")
            request = pb.StimulateRequest(op="system.echo", input_json=json.dumps(PAYLOAD).encode())
            with grpc.insecure_channel(f"unix://{bare_path}") as channel:
                stub = pb_grpc.SidecarStub(channel)
                baseline = measure(lambda i: stub.Stimulate(request))
            with sdk.Client(target) as client:
                echo = measure(lambda i: client.call("system.echo", PAYLOAD))
        finally:
            sidecar.stop()
            bare.stop()
    print("round trip over UDS, 100-byte payload          p50 ms   p99 ms   p50 / bare")
    for name, (p50, p99) in [
        ("bare grpc.aio echo (baseline)", baseline),
        ("system.echo via sdk.Client", echo),
    ]:
        print(f"  {name:<44} {p50:7.3f}  {p99:7.3f}   {p50 / baseline[0]:6.2f}x")


if __name__ == "__main__":
    main()
