"""The standard installs of the README's "Install without make": the SDK alone in an agent's
virtual environment (`soma-runtime-sdk`) calls a sidecar, and `pip install ./sdk .` gives a
working `soma`, while `pip install .` alone finds nothing to satisfy the SDK pin rather than a
stranger's package."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


# Built from copies: pip's in-tree builds leave build files behind in the source directory.
_NOT_SOURCE = shutil.ignore_patterns(
    "__pycache__", "build", "*.egg-info", ".*", "node_modules", "tests", "docs", "benchmarks"
)


def new_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path / "bin" / "python"


def pip_install(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(python), "-m", "pip", "install", "--disable-pip-version-check",
            "-c", str(REPO / "constraints.txt"), *args,
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_a_venv_with_only_the_sdk_calls_a_running_sidecar(
    sidecar: tuple[Process, str], tmp_path: Path
) -> None:
    _, target = sidecar
    source = tmp_path / "sdk-source"
    shutil.copytree(REPO / "sdk", source, ignore=_NOT_SOURCE)
    venv = tmp_path / "agent-venv"
    python = new_venv(venv)
    install = pip_install(python, "--quiet", str(source))
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


@pytest.mark.timeout(300)  # two installs of every pinned package (from pip's cache)
def test_the_runtime_installs_with_pip_beside_its_sdk(tmp_path: Path) -> None:
    source = tmp_path / "checkout"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    python = new_venv(tmp_path / "venv")
    # The SDK's pin names a distribution that is on no index: never a stranger's package.
    alone = pip_install(python, "--dry-run", str(source))
    assert alone.returncode != 0
    assert "No matching distribution found for soma-runtime-sdk==0.1.0" in alone.stderr
    both = pip_install(python, "--quiet", str(source / "sdk"), str(source))
    assert both.returncode == 0, both.stderr
    soma = python.parent / "soma"
    version = subprocess.run(
        [str(soma), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert version.returncode == 0 and version.stdout.strip() == "soma 0.1.0", version.stderr
    cards = subprocess.run(
        [str(soma), "cards", "check"],
        capture_output=True, text=True, timeout=60, check=False, cwd=source,
    )  # fmt: skip
    assert cards.returncode == 0, cards.stdout + cards.stderr
