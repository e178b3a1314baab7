from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, Process, start_sidecar

TEST_ORGANS = [
    "system",
    "tests.fixtures.organs:Acme",
    "tests.fixtures.organs:Composite",
    "tests.fixtures.organs:Manual",
]


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[Process, str]]:
    """A real `soma sidecar` serving the test organs; stopped (and checked) afterwards."""
    # Every call logged: tests read the sidecar's `call` events (debug by default).
    extra = '[organ.acme]\ngreeting = "Howdy"\n[logging]\ncalls = "info"\n'
    proc, target = start_sidecar(tmp_path, TEST_ORGANS, extra)
    yield proc, target
    code = proc.stop()
    assert code == 0, proc.output()


NPM_CLIENTS = Path(__file__).parent / "fixtures" / "ts_client"


@pytest.fixture(scope="session")
def npm_clients() -> Path:
    """MCP clients from npm at the versions pinned in tests/fixtures/ts_client/package.json
    (the TypeScript SDK, mcp-remote), installed once into .soma/npm/<digest of package.json>
    (a new pin installs afresh), with the fixture's scripts beside them."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the npm MCP clients (not installed)")
    package = (NPM_CLIENTS / "package.json").read_bytes()
    directory = REPO / ".soma" / "npm" / hashlib.sha256(package).hexdigest()[:16]
    if not (directory / "node_modules" / ".package-lock.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "package.json").write_bytes(package)
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=directory,
            check=True,
            timeout=300,
        )
    for script in NPM_CLIENTS.glob("*.mjs"):
        shutil.copy(script, directory / script.name)
    return directory
