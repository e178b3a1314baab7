"""Where a running bridge instance can be reached: `<runtime_dir>/bridges/<name>.url`.

An instance may listen on port 0 (a free port picked at start), so its URL is only known once
it serves. The sidecar writes the URL here when the instance serves and removes it when it
stops; `soma mcp stdio` and the `make run` launcher read it. The directory is private (0700)
like the rest of the runtime directory; the file holds no secret.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from soma_runtime.unix import ensure_private_dir, private_umask

BRIDGES_DIR = "bridges"


def url_file(runtime_dir: Path, bridge: str) -> Path:
    return runtime_dir / BRIDGES_DIR / f"{bridge}.url"


def publish(runtime_dir: Path, bridge: str, url: str) -> Path:
    """Write the URL atomically (a reader sees the old file or the whole new one)."""
    path = url_file(runtime_dir, bridge)
    ensure_private_dir(path.parent)
    fresh = path.with_name(f".{path.name}.{os.getpid()}")
    with private_umask():
        fresh.write_text(url + "\n")
    os.replace(fresh, path)
    return path


def withdraw(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def published_url(runtime_dir: Path, bridge: str) -> str | None:
    """The URL the running instance published, None when it has not (no sidecar serves it)."""
    try:
        return url_file(runtime_dir, bridge).read_text().strip() or None
    except FileNotFoundError:
        return None
