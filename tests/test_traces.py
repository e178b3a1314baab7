"""The README's traces command, run as written: `opentelemetry-instrument` (the `otel` extra)
around `soma supervise`, exporting over OTLP/HTTP to a stand-in collector; a runtime's call
arrives there as the sidecar's span, a child of the agent's own span."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.helpers import REPO, Process, SupervisorRun, child_env, wait_until
from tests.test_readme import the

INSTRUMENT = ".venv/bin/opentelemetry-instrument"
ENDPOINT = "http://127.0.0.1:4318"  # the collector's address in the README's command

AGENT = """
import sdk
from opentelemetry import trace

with trace.get_tracer("agent").start_as_current_span("agent work"):
    with sdk.Client.from_env() as client:
        print(client.call("system.echo", {"hello": "traces"}), flush=True)
"""


def readme_lines() -> list[str]:
    """The README's traces block, continuation lines joined."""
    return the(INSTRUMENT).body.replace("\\\n", " ").splitlines()


def readme_command(config: Path, endpoint: str) -> list[str]:
    """The README's command as argv: this checkout's venv, the test's config and collector."""
    (line,) = [line for line in readme_lines() if line.startswith(INSTRUMENT)]
    argv = shlex.split(line)
    bin_dir = str(Path(sys.executable).parent)
    replaced = []
    for word in argv:
        if word.startswith(".venv/bin/"):
            word = bin_dir + word.removeprefix(".venv/bin")
        replaced.append({ENDPOINT: endpoint, "soma.toml": str(config)}.get(word, word))
    assert replaced.count(endpoint) == 1 and replaced.count(str(config)) == 1, argv
    return replaced


class Collector:
    """A stand-in OTLP/HTTP collector: the spans posted to /v1/traces, by name."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest.FromString(body)
                    for resource in request.resource_spans:
                        for scope in resource.scope_spans:
                            spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def named(self, name: str) -> list[Any]:
        return [span for span in self.spans if span.name == name]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    yield server
    server.close()


def attributes(span: Any) -> dict[str, str]:
    return {a.key: a.value.string_value for a in span.attributes}


def test_the_readme_command_exports_the_sidecar_s_span_of_a_call(
    tmp_path: Path, collector: Collector
) -> None:
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    config = SupervisorRun.write(
        tmp_path,
        f'[tracing]\nopentelemetry = true\n\n[[runtime]]\nname = "agent"\n'
        f'command = ["python", "{agent}"]\nallow = ["system.*"]\nrestart = "never"\n',
    )
    run = Process(readme_command(config, collector.url), tmp_path / "log", cwd=tmp_path)
    try:
        wait_until(
            lambda: collector.named("system.echo") and collector.named("agent work"),
            timeout=45,
            what="the sidecar's and the agent's spans at the collector",
        )
    finally:
        assert run.stop(timeout=30) == 0, run.output()
    assert "{'hello': 'traces'}" in run.output()
    (call,) = collector.named("system.echo")
    (work,) = collector.named("agent work")
    assert attributes(call) == {"soma.runtime": "agent", "soma.outcome": "ok"}
    assert call.trace_id == work.trace_id and call.parent_span_id == work.span_id


def test_without_the_separator_the_config_option_is_ambiguous(tmp_path: Path) -> None:
    """Why the README's command has `--` before `soma`."""
    argv = readme_command(tmp_path / "soma.toml", ENDPOINT)
    argv.remove("--")
    result = subprocess.run(
        argv, env=child_env(), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "ambiguous option: --config could match --configurator, --config_file" in result.stderr


def test_the_otel_extra_is_pinned_and_installed_for_development() -> None:
    """The extra the README installs exists, each of its pins is in constraints.txt, and the
    dev extra (what `make` installs) has them, so the tests above run under `make test`."""
    (install,) = [line for line in readme_lines() if "pip install" in line]
    (extra,) = re.findall(r"'\.\[(\w+)\]'", install)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    constraints = set((REPO / "constraints.txt").read_text().splitlines())
    assert extras[extra]
    for pin in extras[extra]:
        assert pin in constraints and pin in extras["dev"], pin
