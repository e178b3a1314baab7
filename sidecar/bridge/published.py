"""Where a running bridge instance can be reached: `<runtime_dir>/bridges/<name>.url`.

An instance may listen on port 0 (a free port picked at start), so its URL is only known once
it serves. The sidecar writes the URL here when the instance serves and removes it when it
stops, unless another sidecar has replaced it meanwhile; `soma mcp stdio` and the `make run`
launcher read it. The directory is private (0700) like the rest of the runtime directory; the
file holds no secret.
"""

from __future__ import annotations

from pathlib import Path

from soma_runtime.owned_files import OwnedFile
from soma_runtime.unix import ensure_private_dir

BRIDGES_DIR = "bridges"


def url_file(runtime_dir: Path, bridge: str) -> Path:
    return runtime_dir / BRIDGES_DIR / f"{bridge}.url"


def publish(runtime_dir: Path, bridge: str, url: str) -> OwnedFile:
    """Write the URL; the file written, for its removal at stop."""
    path = url_file(runtime_dir, bridge)
    ensure_private_dir(path.parent)
    return OwnedFile.write(path, url + "\n")


def published_url(runtime_dir: Path, bridge: str) -> str | None:
    """The URL the running instance published, None when it has not (no sidecar serves it)."""
    try:
        return url_file(runtime_dir, bridge).read_text().strip() or None
    except FileNotFoundError:
        return None
