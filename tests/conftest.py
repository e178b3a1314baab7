from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Process, start_sidecar

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
