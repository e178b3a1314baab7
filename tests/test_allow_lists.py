"""Allow-list globs that match nothing: refused when they never can, warned about otherwise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from soma_runtime.allow_lists import Unmatched, check_allow_lists
from soma_runtime.config import ConfigError, RuntimeSection
from tests.helpers import SupervisorRun

FUNCTIONS = ["system.ping", "system.echo", "vault.store", "similarity.search"]


def _runtimes(*allows: list[str]) -> list[RuntimeSection]:
    return [
        RuntimeSection(name=f"r{i}", command=["true"], allow=allow)
        for i, allow in enumerate(allows)
    ]


def test_globs_that_match_pass_silently() -> None:
    allows = ["system.*", "*", "vault.store", "similarity.*", "sys*", "*.search"]
    assert check_allow_lists(_runtimes(allows), FUNCTIONS) == []


def test_a_glob_naming_no_loaded_organ_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as raised:
        check_allow_lists(_runtimes(["system.ping"], ["vault.*", "sytem.*"]), FUNCTIONS)
    message = str(raised.value)
    assert message.startswith("runtime[1].allow[1]: 'sytem.*' can match no function")
    assert message.endswith("did you mean 'system.*'?")


def test_every_glob_that_can_never_match_is_refused_at_once() -> None:
    """One start tells the operator about every typo, not one per start."""
    allows = (["sytem.*", "system.ping", "similarty.search"], ["vualt.store", "system.pnig"])
    with pytest.raises(ConfigError) as raised:
        check_allow_lists(_runtimes(*allows), FUNCTIONS)
    message = str(raised.value)
    assert re.findall(r"(runtime\[\d\]\.allow\[\d\]): '", message) == [
        "runtime[0].allow[0]",
        "runtime[0].allow[2]",
        "runtime[1].allow[0]",
    ]
    for hint in ("'system.*'", "'similarity.search'", "'vault.store'"):
        assert f"did you mean {hint}?" in message


def test_a_glob_matching_no_function_of_a_loaded_organ_is_reported() -> None:
    found = check_allow_lists(_runtimes(["system.pnig", "system.*"]), FUNCTIONS)
    assert found == [Unmatched("runtime[0].allow[0]", "system.pnig", "system.ping")]


def test_a_supervised_sidecar_refuses_a_typo_and_the_supervisor_stops_with_2(
    tmp_path: Path,
) -> None:
    body = '[[runtime]]\nname = "a"\ncommand = ["python", "-c", "pass"]\nallow = ["sytem.*"]\n'
    run = SupervisorRun(tmp_path, body)
    try:
        code = run.proc.wait(timeout=20)
    finally:
        run.stop()
    output = run.proc.output()
    assert code == 2, output
    assert "runtime[0].allow[0]: 'sytem.*' can match no function" in output
    assert "did you mean 'system.*'?" in output


def test_a_supervised_sidecar_warns_about_a_glob_matching_nothing(tmp_path: Path) -> None:
    body = (
        '[[runtime]]\nname = "a"\ncommand = ["python", "-c", "import time; time.sleep(60)"]\n'
        'allow = ["system.pnig"]\n'
    )
    run = SupervisorRun(tmp_path, body)
    try:
        run.wait_ready()
        output = run.proc.output()
    finally:
        assert run.stop() == 0, run.proc.output()
    assert "allow_matches_nothing" in output
    assert "system.ping" in output
