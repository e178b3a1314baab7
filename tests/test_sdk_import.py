"""`import sdk` stays cheap: no pydantic, cryptography, mcp, starlette or uvicorn."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO

HEAVY = [
    "pydantic",
    "cryptography",
    "mcp",
    "starlette",
    "uvicorn",
    "soma_runtime",
    "sidecar",
    "jsonschema",
    "structlog",
]


def test_import_sdk_loads_only_grpc_and_protobuf() -> None:
    probe = "import json, sys, sdk; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    loaded = {name.split(".")[0] for name in json.loads(result.stdout)}
    assert "grpc" in loaded  # the probe really imported the SDK
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
