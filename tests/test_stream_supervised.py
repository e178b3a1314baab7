"""The Stream on supervised runtimes' own channels: each call meets its runtime's allow-list
and credentials, as unary Stimulate does."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import TEST_ORGANS, SupervisorRun, read_report, set_secret, wait_until

OPS = "system.echo,acme.fail,keyring.whoami"
RUNTIMES = f"""
[[credential]]
name = "crm"
hosts = ["api.crm.example"]

[[runtime]]
name = "trusted"
command = ["python", "-m", "tests.fixtures.agents", "stream", "trusted.jsonl"]
allow = ["system.*", "keyring.whoami"]
credentials = ["crm"]
env = {{ STREAM_OPS = "{OPS}" }}

[[runtime]]
name = "plain"
command = ["python", "-m", "tests.fixtures.agents", "stream", "plain.jsonl"]
allow = ["system.echo", "keyring.whoami"]
env = {{ STREAM_OPS = "{OPS}" }}
"""


def test_each_call_meets_its_runtimes_allow_list_and_credentials(tmp_path: Path) -> None:
    organs = (*TEST_ORGANS, "tests.fixtures.organs:Keyring")
    set_secret(SupervisorRun.write(tmp_path, RUNTIMES, organs), "crm", "s3cret-crm-value")
    run = SupervisorRun(tmp_path, RUNTIMES, organs=organs)
    try:
        run.wait_ready()

        def streamed(name: str) -> dict[str, object]:
            found = [r["stream"] for r in read_report(tmp_path / f"{name}.jsonl") if "stream" in r]
            return found[0] if found else {}

        wait_until(lambda: streamed("trusted") and streamed("plain"), 30, "both streams")
        assert streamed("trusted") == {
            "system.echo": {},
            "acme.fail": "PERMISSION_DENIED",
            "keyring.whoami": {"credential": "crm", "to_crm": True},
        }
        assert streamed("plain") == {
            "system.echo": {},
            "acme.fail": "PERMISSION_DENIED",
            "keyring.whoami": "PERMISSION_DENIED",  # no credential for this runtime
        }
        assert "s3cret" not in run.proc.output()
    finally:
        assert run.stop() == 0, run.proc.output()
