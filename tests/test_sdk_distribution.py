"""The SDK installs alone: an agent's virtual environment with only `soma-sdk` calls a sidecar."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, Process

PROBE = """
import importlib.util, json, sys
import sdk
server_side = ["soma_runtime", "sidecar", "pydantic", "cryptography", "mcp", "starlette"]
with sdk.Client(sys.argv[1]) as client:
    answer = client.call("system.echo", {"hello": "world"})
print(json.dumps({
    "answer": answer,
    "importable": [m for m in server_side if importlib.util.find_spec(m) is not None],
    "sdk_from": sdk.__file__,
}))
"""


def test_a_venv_with_only_the_sdk_calls_a_running_sidecar(
    sidecar: tuple[Process, str], tmp_path: Path
) -> None:
    _, target = sidecar
    source = tmp_path / "sdk-source"  # built from a copy: no build files in the repository
    shutil.copytree(REPO / "sdk", source, ignore=shutil.ignore_patterns("__pycache__", "build"))
    venv = tmp_path / "agent-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [
            str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "-c", str(REPO / "constraints.txt"), str(source),
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    result = subprocess.run(
        [str(python), "-c", PROBE, target],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["answer"] == {"hello": "world"}
    assert report["importable"] == []
    assert report["sdk_from"].startswith(str(venv))
