"""The function names of an upstream's tools: one that another organ has is refused at setup
(a clear error, exit 2, never a crash loop), and an approved one never moves, whatever tool
the upstream adds beside it, through `soma upstream approve` and a restart."""

from __future__ import annotations

import hashlib
import sqlite3
import tomllib
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import sdk
from sidecar.loading import load_organs
from sidecar.upstream.names import assign
from sidecar.upstream.pins import PINS_FILE
from soma_runtime import FunctionCard, Organ, OrganCard, Response, Stimulus
from soma_runtime.config import ConfigError, load_config, parse_config
from tests.helpers import SOMA, Process, SupervisorRun, run_soma, start_sidecar
from tests.test_upstream import (
    TOKEN,
    Host,
    eventually,
    hosting,
    http_table,
    http_upstream,
    origin,
    write_config,
)

# `similarity.search` is a function of the built-in vault organ (its sub-organ `similarity`).
CLASH = '[[upstream]]\nname = "similarity"\nurl = "{url}"\n'


def _no_crash(output: str) -> None:
    assert "Traceback" not in output, output
    assert "'similarity'" in output and "'vault'" in output, output


def test_the_sidecar_refuses_an_upstream_named_like_a_sub_organ(tmp_path: Path) -> None:
    with http_upstream(tmp_path) as (url, state):
        (state / "extra").write_text("search\n")
        config = SupervisorRun.write(
            tmp_path,
            CLASH.format(url=url),
            organs=("system", "vault"),
            sidecar='socket = "run/s.sock"',
        )
        result = run_soma("sidecar", "--config", str(config))
    assert result.returncode == 2, result.stderr
    _no_crash(result.stderr)
    assert "upstream[0].name: 'similarity' is taken by the sub-organ" in result.stderr


def test_the_supervisor_stops_at_once_on_an_upstream_named_like_a_sub_organ(
    tmp_path: Path,
) -> None:
    with http_upstream(tmp_path) as (url, state):
        (state / "extra").write_text("search\n")
        runtime = '[[runtime]]\nname = "agent"\ncommand = ["sleep", "60"]\n'
        config = SupervisorRun.write(
            tmp_path, CLASH.format(url=url) + runtime, organs=("system", "vault")
        )
        proc = Process([SOMA, "supervise", "--config", str(config)], tmp_path / "supervise.log")
        try:
            code = proc.wait(timeout=30)
        finally:
            proc.kill()
    assert code == 2, proc.output()
    _no_crash(proc.output())


class Squatter(Organ):
    """An organ whose function is in the `tickets` namespace."""

    def describe(self) -> OrganCard:
        card = FunctionCard(
            name="tickets.get_ticket",
            description="Not the upstream's",
            tags=[],
            examples=[],
            input_schema={"type": "object"},
            output_schema={"type": "object"},
            slo={"p95_latency_ms": 10, "max_error_rate": 0.01},
            residency="Local",
            idempotent=True,
            side_effects=[],
        )
        return OrganCard(
            name="squatter",
            version="1",
            description="Squats",
            division="test",
            subsystem="test",
            tags=[],
            execution_modes=["async"],
            functions=[card],
        )

    async def stimulate(self, stimulus: Stimulus) -> Response:
        return Response(ok=True, output={"squatter": True})


async def test_a_discovered_tool_whose_name_another_organ_has_is_left_out(
    tmp_path: Path,
) -> None:
    """The configuration refuses the namespaces organs declare; an organ that took one all the
    same (hosted without that check) keeps its function, the upstream's tool is left out with a
    warning, and the upstream's other tools serve."""
    with http_upstream(tmp_path) as (url, _):
        host = Host(write_config(tmp_path, http_table(url), host=origin(url)))
        host.executive.register(Squatter())
        with capture_logs() as logs:
            await host.executive.start()
        try:
            functions = dict((f.name, organ) for organ, f in host.executive.list_functions())
            assert functions["tickets.get_ticket"] == "squatter"
            assert functions["tickets.close-ticket"] == "tickets"
            taken = [e for e in logs if e["event"] == "upstream_tool_name_taken"]
            assert [(e["function"], e["organ"]) for e in taken] == [
                ("tickets.get_ticket", "squatter")
            ]
            answer = await host.executive.stimulate(Stimulus("tickets.get_ticket", {}))
            assert answer.output == {"squatter": True}
        finally:
            await host.executive.stop()
            await host.vault.close()


def test_an_upstream_named_like_an_organs_functions_is_a_config_error(tmp_path: Path) -> None:
    organs = '[sidecar]\norgans = ["system", "tests.test_upstream_names:Squatter"]\n'
    upstream = CLASH.format(url="http://127.0.0.1:9/mcp")
    (tmp_path / "soma.toml").write_text(organs + upstream.replace("similarity", "tickets"))
    taken = r"'tickets' is taken by the function 'tickets\.get_ticket' of organ 'squatter'"
    with pytest.raises(ConfigError, match=taken):
        load_organs(load_config(tmp_path / "soma.toml"))
    twice = upstream * 2
    with pytest.raises(ConfigError, match=r"upstream\[1\]\.name: 'similarity' is used twice"):
        parse_config(tomllib.loads(twice))


def test_a_suffixed_name_never_takes_a_name_already_given() -> None:
    """Plain names first; a suffix taken already (a tool named like another's suffixed name)
    gives the whole digest; a tool no name is left for is left out."""
    digest = hashlib.sha256(b"Get_Ticket").hexdigest()
    crafted = f"get_ticket_{digest[:6]}"
    names = assign("t", ["get_ticket", "Get_Ticket", crafted], {"get_ticket": "t.get_ticket"})
    assert names == {crafted: f"t.{crafted}", "Get_Ticket": f"t.get_ticket_{digest}"}
    kept = {"a": "t.get_ticket", "b": f"t.{crafted}", "c": f"t.get_ticket_{digest}"}
    assert assign("t", ["Get_Ticket"], kept) == {}


def suffixed(tool: str) -> str:
    return "tickets.get_ticket_" + hashlib.sha256(tool.encode()).hexdigest()[:6]


async def test_a_new_tool_never_renames_an_approved_one(tmp_path: Path) -> None:
    """`Get_Ticket` appears beside the approved `get_ticket` (a list-changed event while the
    upstream is hosted): `tickets.get_ticket` stays `get_ticket`'s, before and after the
    newcomer is approved under its own name, and after a restart of a real sidecar."""
    newcomer = suffixed("Get_Ticket")
    with http_upstream(tmp_path) as (url, _):
        config = write_config(tmp_path, http_table(url, refresh_interval=3600), host=origin(url))
        async with hosting(config) as host:
            assert (await host.call("tickets.offer", {"id": "Get_Ticket"})).ok
            await eventually(lambda: newcomer in host.upstream._quarantined)
            assert "tickets.get_ticket" in host.functions()
            kept = await host.call("tickets.get_ticket", {"id": "7"})
            assert kept.output == {"id": "7", "title": "ticket 7"}

            approve = run_soma("upstream", "approve", "tickets", "--config", str(config.source))
            assert approve.returncode == 0, approve.stderr
            await host.upstream.refresh()
            assert {"tickets.get_ticket", newcomer} <= set(host.functions())
            assert (await host.call("tickets.get_ticket", {"id": "7"})).output["title"] == (
                "ticket 7"
            )
            assert (await host.call(newcomer, {"id": "7"})).output["title"] == "TICKET 7"

        credential = f'[[credential]]\nname = "{TOKEN}"\nhosts = ["{origin(url)}"]\n'
        table = credential + http_table(url)
        proc, target = start_sidecar(tmp_path, ["system"], table)  # the same state directory
        try:
            with sdk.Client(target) as client:
                assert client.call("tickets.get_ticket", {"id": "8"})["title"] == "ticket 8"
                assert client.call(newcomer, {"id": "8"})["title"] == "TICKET 8"
        finally:
            proc.stop()


async def test_pins_approved_before_names_were_kept_keep_theirs(tmp_path: Path) -> None:
    """A pin database without function names (written by an earlier version) gets them by the
    rule among the approved tools first: a newcomer does not take an approved tool's name."""
    with http_upstream(tmp_path) as (url, state):
        config = write_config(tmp_path, http_table(url), host=origin(url))
        async with hosting(config):
            pass
        with sqlite3.connect(config.state_dir / PINS_FILE) as db:
            for table in ("upstream_pins", "upstream_seen"):
                db.execute(f"ALTER TABLE {table} DROP COLUMN function")
        (state / "extra").write_text("Get_Ticket\n")
        async with hosting(config) as host:
            assert host.functions()["tickets.get_ticket"].description == "Look up a ticket by id"
            assert suffixed("Get_Ticket") in host.upstream._quarantined
            answer = await host.call("tickets.get_ticket", {"id": "3"})
            assert answer.output == {"id": "3", "title": "ticket 3"}
