"""Every code block of the README is exercised: what it shows works as shown.

Each block is claimed by exactly one check below (by the line its fence opens on is not
stable, so by a phrase it contains); a block no check claims fails `test_every_block_is_checked`,
so a new block needs a check before it lands.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.loading import load_organs
from soma_runtime import Executive, Stimulus
from soma_runtime.config import parse_config
from tests.fake_upstream import MODELS, FakeUpstream
from tests.helpers import REPO, SOMA, SupervisorRun, set_secret, start_sidecar, wait_until

README = REPO / "README.md"


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    body: str


def blocks() -> list[Block]:
    text = README.read_text()
    return [
        Block(text[: m.start()].count("\n") + 1, m.group(1), m.group(2))
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
    ]


def the(phrase: str) -> Block:
    """The one block containing `phrase`."""
    found = [b for b in blocks() if phrase in b.body]
    assert len(found) == 1, f"{len(found)} README blocks contain {phrase!r}"
    return found[0]


# Each check claims its blocks by these phrases.
CLAIMS = {
    "from_env": "sdk.Client.from_env() as client",
    "local_client": 'sdk.Client(f"unix://{os.getcwd()}',
    "organ_skeleton": "class MyOrgan(Organ)",
    "organ_example": "class Acme(RoutedOrgan)",
    "full_config": '[soma]\nstate_dir = ".soma/state"',
    "runtime_table": "# unique, [a-z0-9-]",
    "vault_table": "[vault]\nkek =",
    "metrics_table": "[metrics]\nlisten =",
    "credential_tables": '[[credential]]\nname = "openai"',
    "gateway_tables": "[[gateway]]",
    "bridge_table": '[[bridge]]\nname = "support"',
    "mcp_servers_json": '"mcpServers"',
    "upstream_table": '[[upstream]]\nname = "tickets"',  # with its [[credential]]
    "status_output": "NAME     KIND     STATE",
    "http_call": 'client.call("http.request"',
    "openai_client": "from openai import OpenAI",
    "node_runtime": 'command = ["node", "examples/node/client.mjs"]',  # run: test_node_example
}
SHELL_BLOCK = "sh"


def test_every_block_is_checked() -> None:
    unclaimed = [
        f"line {b.line}"
        for b in blocks()
        if b.lang != SHELL_BLOCK and not any(phrase in b.body for phrase in CLAIMS.values())
    ]
    assert unclaimed == []
    for phrase in CLAIMS.values():
        the(phrase)  # each claims exactly one block


def test_the_runtime_example_runs_under_the_supervisor(tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(the(CLAIMS["from_env"]).body)
    run = SupervisorRun(
        tmp_path,
        f'[[runtime]]\nname = "readme"\ncommand = ["python", "{script}"]\n'
        'allow = ["system.*"]\nrestart = "never"\n',
    )
    try:
        run.wait_ready()
        wait_until(
            lambda: any(e.get("line") == "{'hello': 'world'}" for e in run.events("output")),
            timeout=30,
            what="the example's output",
        )
    finally:
        assert run.stop() == 0


def test_the_standalone_client_example_runs_from_the_sidecar_s_directory(tmp_path: Path) -> None:
    import subprocess

    proc, _ = start_sidecar(tmp_path, ["system"], socket=tmp_path / ".soma/run/sidecar.sock")
    try:
        result = subprocess.run(
            [sys.executable, "-c", the(CLAIMS["local_client"]).body],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "{'hello': 'world'}"
    finally:
        assert proc.stop() == 0


def organ_module(tmp_path: Path) -> Path:
    """The README's organ example as `my_pkg/organs.py`, the path its config snippet names."""
    package = tmp_path / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "organs.py").write_text(the(CLAIMS["organ_example"]).body)
    return tmp_path


def readme_config(tmp_path: Path, *phrases: str) -> dict[str, Any]:
    """The TOML of the blocks claimed by `phrases`, merged in order (tables by name)."""
    merged: dict[str, Any] = {}
    for phrase in phrases:
        for key, value in tomllib.loads(the(phrase).body).items():
            if isinstance(value, list):
                named = {item.get("name"): item for item in merged.get(key, [])}
                for item in value:
                    named.setdefault(item.get("name"), {}).update(item)
                merged[key] = list(named.values())
            elif isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    return merged


def test_the_config_example_loads_the_organ_example_with_its_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(organ_module(tmp_path)))
    data = readme_config(tmp_path, CLAIMS["full_config"])
    data["soma"] = {"state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run")}
    config = parse_config(data, source=tmp_path / "soma.toml")
    executive = Executive(load_organs(config))
    greeting = data["organ"]["acme"]["greeting"]

    async def calls() -> tuple[Any, Any]:
        ok = await executive.stimulate(Stimulus("acme.greet", {"name": "Ada"}))
        failed = await executive.stimulate(Stimulus("acme.greet", {"name": "nobody"}))
        return ok.output, failed.output

    ok, failed = asyncio.run(calls())
    assert ok == {"greeting": f"{greeting}, Ada!"}
    assert failed["error"] == "NotFound"


def test_the_organ_skeleton_is_the_contract() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(the(CLAIMS["organ_skeleton"]).body, "README", "exec"), namespace)
    from soma_runtime import Organ

    assert issubclass(namespace["MyOrgan"], Organ)


@pytest.mark.parametrize(
    "phrases",
    [
        (CLAIMS["runtime_table"],),
        (CLAIMS["node_runtime"],),
        (CLAIMS["vault_table"],),
        (CLAIMS["metrics_table"],),
        (CLAIMS["credential_tables"],),
        (CLAIMS["credential_tables"], CLAIMS["gateway_tables"]),
        (CLAIMS["bridge_table"],),
        (CLAIMS["upstream_table"],),
    ],
)
def test_each_config_fragment_is_valid(tmp_path: Path, phrases: tuple[str, ...]) -> None:
    data = readme_config(tmp_path, *phrases)
    data.setdefault("sidecar", {}).setdefault("organs", ["system", "http"])
    for runtime in data.get("runtime", []):
        runtime.setdefault("command", ["python", "-c", "pass"])
    parse_config(data, source=tmp_path / "soma.toml")


def test_the_stdio_client_config_names_a_real_command() -> None:
    import json
    import subprocess

    server = json.loads(the(CLAIMS["mcp_servers_json"]).body)["mcpServers"]["soma-local"]
    assert server["command"].endswith("/.venv/bin/soma")
    assert set(server["env"]) == {"SOMA_BRIDGE_KEY"}  # the key never in the arguments
    args = [a for a in server["args"] if not a.startswith("/")]
    result = subprocess.run(
        [SOMA, *args[:2], "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--bridge" in result.stdout


@pytest.fixture
def model_api() -> Iterator[FakeUpstream]:
    """A local stand-in of the API the README's snippets call."""
    api = FakeUpstream()
    yield api
    api.close()


SECRET = "sk-readme-0123456789abcdef"
README_API = "https://api.openai.com"


def tables_for(tmp_path: Path, model_api: FakeUpstream, *phrases: str) -> dict[str, Any]:
    """The README's tables claimed by `phrases`, the credential bound to the stand-in."""
    data = readme_config(tmp_path, *phrases)
    for credential in data["credential"]:
        credential["hosts"] = [model_api.url]
    for gateway in data.get("gateway", []):
        gateway["upstream"] = gateway["upstream"].replace(README_API, model_api.url)
    return data


def test_the_http_request_snippet_sends_the_credential_to_its_host(
    tmp_path: Path, model_api: FakeUpstream
) -> None:
    """The README's `http.request` call and its `[[credential]]`, against a standalone sidecar,
    with the API's origin moved to the stand-in."""
    import tomli_w

    import sdk

    tables = tables_for(tmp_path, model_api, CLAIMS["credential_tables"])
    extra = tomli_w.dumps({"credential": tables["credential"]})
    proc, target = start_sidecar(tmp_path, ["system", "http"], extra=extra)
    try:
        set_secret(tmp_path / "soma.toml", "openai", SECRET)
        snippet = the(CLAIMS["http_call"]).body.replace(README_API, model_api.url)
        with sdk.Client(target) as client:
            answer = eval(compile(snippet, "README", "eval"), {"client": client})
    finally:
        assert proc.stop() == 0, proc.output()
    assert answer["status"] == 200 and json.loads(answer["body"]) == MODELS
    assert [(r.path, r.headers["authorization"]) for r in model_api.requests] == [
        ("/v1/models", f"Bearer {SECRET}")
    ]


OPENAI_CHECK = """
import json
print(json.dumps({
    "placeholder": client.api_key.startswith("soma_pk_"),
    "models": [model.id for model in client.models.list()],
}), flush=True)
"""


def test_the_openai_snippet_talks_through_the_gateway_holding_only_a_placeholder(
    tmp_path: Path, model_api: FakeUpstream
) -> None:
    """The README's openai snippet, unmodified, as the runtime of its `[[gateway]]` and
    `[[credential]]` tables; the client lists the stand-in's models with the real key."""
    import tomli_w

    agent = tmp_path / "agent.py"
    agent.write_text(the(CLAIMS["openai_client"]).body + OPENAI_CHECK)
    tables = tables_for(tmp_path, model_api, CLAIMS["credential_tables"], CLAIMS["gateway_tables"])
    (runtime,) = tables["runtime"]
    runtime.update(command=["python", str(agent)], allow=["system.*"], restart="never")
    config = SupervisorRun.write(tmp_path, tomli_w.dumps(tables))
    set_secret(config, tables["gateway"][0]["credential"], SECRET)
    run = SupervisorRun(tmp_path, tomli_w.dumps(tables))
    try:
        run.wait_ready()
        line = wait_until(
            lambda: next((e["line"] for e in run.events("output") if "models" in e["line"]), None),
            timeout=30,
            what="the agent's answer",
        )
    finally:
        assert run.stop() == 0
    assert json.loads(line) == {"placeholder": True, "models": ["example"]}
    assert [(r.path, r.headers["authorization"]) for r in model_api.requests] == [
        ("/v1/models", f"Bearer {SECRET}")
    ]


def test_the_status_sample_has_the_columns_soma_status_prints() -> None:
    from soma_runtime.supervisor.control import format_status

    header = the(CLAIMS["status_output"]).body.splitlines()[0].split()
    printed = format_status({"children": []}).splitlines()[0].split()
    assert header == printed


def shell_commands() -> Iterator[list[str]]:
    """Each `soma ...` and `make ...` command of the README's shell blocks, as argv."""
    for block in blocks():
        if block.lang != SHELL_BLOCK:
            continue
        for raw in block.body.replace("\\\n", " ").splitlines():  # continuation lines joined
            line = raw.split("  #")[0].strip()
            for part in line.split("|"):
                words = shlex.split(part.replace("&&", "|").split("|")[0], comments=True)
                while words and words[0] in ("sudo",):
                    words = words[1:]
                if words and (words[0].endswith("soma") or words[0] == "make"):
                    yield words


def test_every_soma_and_make_command_shown_exists() -> None:
    import subprocess

    makefile = (REPO / "Makefile").read_text()
    seen = list(shell_commands())
    assert seen
    for words in seen:
        if words[0] == "make":
            target = words[1] if len(words) > 1 else "run"
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), words
            continue
        sub = [w for w in words[1:] if not w.startswith("-")][:2]
        result = subprocess.run(
            [SOMA, *sub, "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:  # the second word was an argument, not a sub-command
            result = subprocess.run(
                [SOMA, *sub[:1], "--help"], capture_output=True, text=True, timeout=60, check=False
            )
        assert result.returncode == 0, (words, result.stderr)


def command_paths() -> list[str]:
    """Every command of the `soma` argparse tree that runs something, as `soma a b`."""
    import argparse

    from soma_cli.main import build_parser

    def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[str]:
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not groups:
            yield path
        for group in groups:
            for name, sub in group.choices.items():
                yield from walk(sub, f"{path} {name}")

    return list(walk(build_parser(), "soma"))


def test_the_command_summary_lists_every_subcommand_and_no_other() -> None:
    development = README.read_text().split("\n## Development\n")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(soma [^`]*)` \|", development, re.M)
    listed = [" ".join(w for w in row.split() if re.fullmatch(r"[a-z][a-z-]*", w)) for row in rows]
    assert sorted(listed) == sorted(command_paths())


def test_every_python_module_command_runs_from_a_fresh_shell() -> None:
    """`python -m ...` written anywhere in the README runs from the repository root in a shell
    that activated nothing: written with the venv's interpreter, the module importable."""
    import subprocess

    commands = re.findall(r"(\S*python\S*) -m ([\w.]+)", README.read_text())
    assert ("`.venv/bin/python", "examples.gateway_demo") in commands
    venv = REPO / ".venv" / "bin" / "python"
    python = ".venv/bin/python" if venv.exists() else sys.executable  # another venv runs the tests
    fresh = {"PATH": "/usr/bin:/bin", "HOME": str(REPO)}
    for interpreter, module in commands:
        if module == "venv":  # making the venv is the one command that precedes it
            assert interpreter == "python3", interpreter
            continue
        assert interpreter.strip("`(") == ".venv/bin/python", (interpreter, module)
        check = f"{python} -c 'import {module}'"
        if module.startswith("examples."):  # the examples' commands: as written, with --help
            check = f"{python} -m {module} --help"
        result = subprocess.run(
            ["bash", "--noprofile", "--norc", "-c", check],
            cwd=REPO,
            env=fresh,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, (module, result.stderr)


def test_the_inspector_command_says_which_node_it_needs(tmp_path: Path) -> None:
    """Where `make run` prints it and in the README: the Inspector's current release needs
    Node >= 22.19 (its package's `engines`)."""
    from examples.run import client_configs

    key_file = tmp_path / "bridge-local.key"
    key_file.write_text("soma_0_0\n")
    config = parse_config({"soma": {"state_dir": "state"}}, source=tmp_path / "soma.toml")
    printed = client_configs(config, "local", "http://127.0.0.1:1/mcp", key_file).splitlines()
    inspector = printed.index("  MCP Inspector (needs Node >= 22.19):")
    assert printed[inspector + 1].lstrip().startswith("npx @modelcontextprotocol/inspector ")
    (bullet,) = [
        line for line in README.read_text().splitlines() if "**the MCP Inspector**" in line
    ]
    assert "needs Node ≥ 22.19" in bullet


def test_the_architecture_document_is_linked_and_holds_the_import_arrows() -> None:
    """docs/architecture.md (the README's "how it is built") states the arrows
    tests/test_layering.py holds."""
    from tests.test_layering import ALLOWED

    assert "[docs/architecture.md](docs/architecture.md)" in README.read_text()
    text = (REPO / "docs" / "architecture.md").read_text()
    layout = text.split("\n## Code layout and import arrows\n")[1].split("\n## ")[0]
    arrows = {
        row[0].strip("` "): tuple(re.findall(r"`([\w.]+)`", row[-1]))
        for row in (line.split("|")[1:-1] for line in layout.splitlines() if line.startswith("| `"))
    }
    assert arrows == {package: tuple(allowed) for package, allowed in ALLOWED.items()}
