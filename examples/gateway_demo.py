"""The gateway example in one command: the stand-in model API on a free loopback port, the
configuration written for that port, and `soma supervise` on it.

    .venv/bin/python -m examples.gateway_demo [--dir .soma/gateway]

It binds the port itself and hands the listening socket to the stand-in
(examples.fake_model), so the origin in the configuration is the stand-in's and no other
process's. The first run stores the example key as the secret `model` (a stand-in key for
the stand-in API); later runs keep whatever `soma secrets set model --config DIR/soma.toml`
stored. Ctrl-C (or SIGTERM) stops the supervisor, then the stand-in.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

from soma_runtime.listeners import tcp_listener

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "examples" / "gateway.toml"
EXAMPLE_KEY = "sk-example-key-0123456789"
SOMA = str(Path(sys.executable).parent / "soma")


def write_config(directory: Path, origin: str) -> Path:
    """examples/gateway.toml with the stand-in's origin and the repository filled in."""
    text = TEMPLATE.read_text().replace("{model_api}", origin).replace("{repo}", str(REPO))
    config = directory / "soma.toml"
    config.write_text(text)
    return config


def has_secret(config: Path, name: str) -> bool:
    listing = subprocess.run(
        [SOMA, "secrets", "list", "--json", "--config", str(config)],
        capture_output=True,
        check=True,
    )
    return any(secret["name"] == name for secret in json.loads(listing.stdout))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.gateway_demo")
    parser.add_argument(
        "--dir",
        type=Path,
        default=REPO / ".soma" / "gateway",
        help="where the configuration, the vault and the sockets go",
    )
    directory = parser.parse_args().dir.resolve()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    listener = tcp_listener("127.0.0.1", 0)
    config = write_config(directory, f"http://127.0.0.1:{listener.getsockname()[1]}")
    print(f"gateway example: configuration written to {config}", flush=True)
    if not has_secret(config, "model"):
        subprocess.run(
            [SOMA, "secrets", "set", "model", "--config", str(config)],
            input=EXAMPLE_KEY.encode(),
            check=True,
        )
    model = subprocess.Popen(
        [sys.executable, "-m", "examples.fake_model", "--fd", str(listener.fileno())],
        pass_fds=(listener.fileno(),),
        cwd=REPO,
    )
    listener.close()
    supervisor = subprocess.Popen([SOMA, "supervise", "--config", str(config)])
    signal.signal(signal.SIGTERM, lambda *_: supervisor.terminate())
    try:
        try:
            code = supervisor.wait()
        except KeyboardInterrupt:  # the supervisor got the Ctrl-C too, and stops in order
            code = supervisor.wait()
    finally:
        model.terminate()
        model.wait()
    return code


if __name__ == "__main__":
    sys.exit(main())
