"""Generated code never drifts from its source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def test_protobuf_stubs_match_the_proto(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    generated = {
        p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
    }
    committed_root = REPO / "sdk" / "protocol" / "soma"
    committed = {
        p.relative_to(REPO): p.read_bytes()
        for p in committed_root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert set(generated) == set(committed), "run `make proto`"
    stale = sorted(str(p) for p in generated if generated[p] != committed[p])
    assert not stale, f"stubs differ from proto/ (run `make proto`): {stale}"
