"""The baseline: a grpc.aio server on uvloop that echoes `input_json` and does nothing else.

python -m benchmarks.bare_server SOCKET_PATH
"""

from __future__ import annotations

import sys
from typing import Any

import grpc
import uvloop

from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc


class Echo(pb_grpc.SidecarServicer):
    async def Stimulate(self, request: pb.StimulateRequest, context: Any) -> pb.StimulateResponse:
        return pb.StimulateResponse(ok=True, output_json=request.input_json)


async def main(path: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_SidecarServicer_to_server(Echo(), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
