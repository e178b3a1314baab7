from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Process, npm_install, start_sidecar

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
    (the TypeScript SDK, mcp-remote), installed once (`npm_install`), with the fixture's
    scripts beside them."""
    directory = npm_install(NPM_CLIENTS)
    for script in NPM_CLIENTS.glob("*.mjs"):
        shutil.copy(script, directory / script.name)
    return directory
