"""`make run`: `soma supervise` on soma.toml, plus what an MCP client needs to reach each of
its bridge instances, printed once they serve.

    .venv/bin/python -m examples.run [--config soma.toml]

For each `[[bridge]]` with API keys, a fresh key is written to `.soma/bridge-<name>.key`
(mode 0600, beside the configuration) and the key of the previous run is revoked, so a key
printed on a terminal lives only until the next run. Instances listen on port 0 (the
supervisor picks a free port at start and keeps it until it stops, across sidecar restarts),
so the URL is read from what the sidecar publishes (`<runtime_dir>/bridges/<name>.url`) when
they serve. When another supervisor or sidecar serves the configuration's runtime directory,
nothing is touched (its keys and URL files stay valid) and the exit status is 2. Otherwise the
directory's lock is taken before anything is touched and handed to the supervisor, so nothing
else can start there in between.
Ctrl-C (or SIGTERM) stops the supervisor, which stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sidecar.bridge.keys import KeyStore
from sidecar.bridge.published import published_url, url_file
from soma_runtime import runtime_lock
from soma_runtime.config import SomaConfig, load_config
from soma_runtime.exit_status import SETUP_ERROR
from soma_runtime.owned_files import OwnedFile

SOMA = str(Path(sys.executable).parent / "soma")
LABEL = "make run"
START_TIMEOUT_S = 60.0


def fresh_key(config: SomaConfig, bridge: str) -> Path:
    """A new key for `bridge` in its 0600 file; the key the file held before is revoked."""
    path = config.resolve(Path(".soma") / f"bridge-{bridge}.key")
    store = KeyStore(config.state_dir)
    if path.exists():
        previous = path.read_text().strip()
        if previous.count("_") == 2:  # soma_<id>_<secret>
            store.revoke(previous.split("_")[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    _, key = store.create(bridge, LABEL)
    OwnedFile.write(path, key + "\n")
    return path


def client_configs(config: SomaConfig, bridge: str, url: str, key_file: Path) -> str:
    """Ready-to-paste settings for MCP clients: HTTP and stdio."""
    key = key_file.read_text().strip()
    name = f"soma-{bridge}"
    header = f'--header "Authorization: Bearer $(cat {key_file})"'
    http = {
        "mcpServers": {
            name: {"type": "http", "url": url, "headers": {"Authorization": f"Bearer {key}"}}
        }
    }
    stdio = {
        "mcpServers": {
            name: {
                "command": SOMA,
                "args": ["mcp", "stdio", "--bridge", bridge, "--config", str(config.source)],
                "env": {"SOMA_BRIDGE_KEY": key},
            }
        }
    }
    return "\n".join(
        [
            f"MCP bridge {bridge!r}: {url}",
            f"  API key (new this run, mode 0600): {key_file}",
            "  Claude Code over HTTP:",
            f"    claude mcp add --transport http {name} {url} {header}",
            "  MCP Inspector (needs Node >= 22.19):",
            f"    npx @modelcontextprotocol/inspector --cli {url} --method tools/list {header}",
            "  A host that speaks only stdio, through mcp-remote (npm):",
            f'    npx -y mcp-remote@0.15.1 {url} --header "x-api-key:$(cat {key_file})"',
            "  Claude Desktop / any mcpServers config, HTTP:",
            "    " + json.dumps(http),
            "  ... or stdio (the client launches `soma mcp stdio`):",
            "    " + json.dumps(stdio),
        ]
    )


def wait_for_urls(
    config: SomaConfig, bridges: list[str], supervisor: subprocess.Popen[bytes]
) -> dict[str, str] | None:
    """Each bridge's published URL; None when the supervisor exits or they do not appear."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while supervisor.poll() is None and time.monotonic() < deadline:
        urls = {b: published_url(config.runtime_dir, b) for b in bridges}
        if all(urls.values()):
            return {b: u for b, u in urls.items() if u is not None}
        time.sleep(0.05)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.run")
    parser.add_argument("--config", type=Path, default=Path("soma.toml"))
    path = parser.parse_args().config
    config = load_config(path)
    bridges = [b.name for b in config.bridge if b.auth.api_keys]
    try:  # before a key is revoked or a URL file removed: they may be another run's
        lock = runtime_lock.acquire(config.runtime_dir, LABEL)
    except runtime_lock.RuntimeDirBusy as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return SETUP_ERROR
    try:
        keys = {bridge: fresh_key(config, bridge) for bridge in bridges}
        for bridge in bridges:  # nothing serves the directory: a file there is a killed sidecar's
            url_file(config.runtime_dir, bridge).unlink(missing_ok=True)
        # The supervisor inherits the lock (the same open file): it is never free meanwhile.
        supervisor = subprocess.Popen(
            [SOMA, "supervise", "--config", str(path)],
            env={**os.environ, runtime_lock.LOCK_FD_ENV: str(lock.fd)},
            pass_fds=(lock.fd,),
        )
    finally:
        lock.release()
    signal.signal(signal.SIGTERM, lambda *_: supervisor.terminate())
    try:
        urls = wait_for_urls(config, bridges, supervisor) if bridges else None
        if urls is not None:
            for bridge, url in urls.items():
                print(client_configs(config, bridge, url, keys[bridge]), flush=True)
        elif bridges and supervisor.poll() is None:
            print("the bridge instances did not publish their URLs in time", file=sys.stderr)
        return supervisor.wait()
    except KeyboardInterrupt:  # the supervisor got the Ctrl-C too, and stops in order
        return supervisor.wait()


if __name__ == "__main__":
    sys.exit(main())
