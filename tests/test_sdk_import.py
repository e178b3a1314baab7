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


def loaded_by(statement: str) -> set[str]:
    probe = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return {name.split(".")[0] for name in json.loads(result.stdout)}


def test_import_sdk_loads_only_grpc_and_protobuf() -> None:
    loaded = loaded_by("import sdk; sdk.Client, sdk.AsyncClient")
    assert "grpc" in loaded  # the probe really imported the clients
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_the_shared_protocol_names_cost_no_grpc() -> None:
    """The supervisor imports `sdk.protocol` for the hand-off names; it must stay light."""
    loaded = loaded_by("import sdk.protocol")
    assert loaded.isdisjoint({"grpc", "google", *HEAVY}), sorted(loaded & {"grpc", "google"})
