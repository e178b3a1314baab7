"""The vault organ and its similarity sub-organ, in process and through a real sidecar."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import stat
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import sdk
from sidecar.organs.vault import VaultOrgan
from sidecar.vault.async_vault import AsyncVault
from sidecar.vault.open import open_vault
from sidecar.vault.store import Vault
from soma_runtime import Executive, OrganEnvironment, Stimulus
from soma_runtime.config import parse_config
from tests.fake_upstream import FakeUpstream
from tests.fixtures.legacy_vault import write_v1_vault
from tests.helpers import SOMA, Process, set_secret, start_sidecar, write_config


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@contextlib.asynccontextmanager
async def vault_executive(tmp_path: Path, **settings: Any) -> AsyncIterator[Executive]:
    config = parse_config({"soma": {"state_dir": str(tmp_path / "state")}})
    vault = AsyncVault(lambda: open_vault(config, durable=False))
    organ = VaultOrgan()
    env = OrganEnvironment(config.state_dir, config.runtime_dir, {AsyncVault: vault})
    organ.configure(settings, env)
    executive = Executive([organ])
    await executive.start()
    try:
        yield executive
    finally:
        await executive.stop()
        await vault.close()


@pytest.fixture
async def executive(tmp_path: Path) -> AsyncIterator[Executive]:
    async with vault_executive(tmp_path, max_blob_bytes=1000) as executive:
        yield executive


async def call(
    executive: Executive, op: str, input: dict[str, Any], caller: str | None = "claims"
) -> Any:
    response = await executive.stimulate(Stimulus(op, input, {}, caller=caller))
    return response.output


def test_the_organ_uses_the_hosts_vault_and_refuses_a_host_without_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="this host provides no AsyncVault"):
        VaultOrgan().configure({}, OrganEnvironment(tmp_path, tmp_path))


async def test_store_retrieve_list_delete(executive: Executive) -> None:
    stored = await call(
        executive,
        "vault.store",
        {"key": "doc-1", "data": b64(b"hello"), "metadata": {"kind": "note"}},
    )
    assert stored == {"stored": True, "key": "doc-1", "revision": 1, "size_bytes": 5}
    again = await call(executive, "vault.store", {"key": "doc-1", "data": b64(b"hello!")})
    assert again["revision"] == 2
    got = await call(executive, "vault.retrieve", {"key": "doc-1"})
    assert base64.b64decode(got["data"]) == b"hello!" and got["metadata"] == {}
    for i in range(3):
        await call(executive, "vault.store", {"key": f"page-{i}", "data": b64(b"p")})
    first = await call(executive, "vault.list", {"prefix": "page-", "limit": 2})
    assert [i["key"] for i in first["items"]] == ["page-0", "page-1"]
    rest = await call(executive, "vault.list", {"prefix": "page-", "after": first["next_after"]})
    assert [i["key"] for i in rest["items"]] == ["page-2"] and "next_after" not in rest
    assert await call(executive, "vault.delete", {"key": "doc-1"}) == {"deleted": True}
    assert await call(executive, "vault.delete", {"key": "doc-1"}) == {"deleted": False}
    missing = await call(executive, "vault.retrieve", {"key": "doc-1"})
    assert missing["error"] == "NotFound"


async def test_runtimes_have_their_own_namespaces(executive: Executive) -> None:
    await call(executive, "vault.store", {"key": "k", "data": b64(b"claims' own")}, "claims")
    other = await call(executive, "vault.retrieve", {"key": "k"}, caller="triage")
    assert other["error"] == "NotFound"
    assert (await call(executive, "vault.list", {}, caller="triage"))["items"] == []


async def test_bad_blobs_are_refused(executive: Executive) -> None:
    bad = await call(executive, "vault.store", {"key": "k", "data": "not base64!"})
    assert bad["error"] == "InvalidInput" and bad["path"] == "$.data"
    big = await call(executive, "vault.store", {"key": "k", "data": b64(b"x" * 1001)})
    assert big["error"] == "TooLarge"
    meta = await call(
        executive, "vault.store", {"key": "k", "data": "", "metadata": {"m": "x" * 20000}}
    )
    assert meta["error"] == "TooLarge" and meta["path"] == "$.metadata"
    for key in ("../x", "a/b", ".hidden", "x" * 256, "a..b", "x\n", "doc-1\n"):
        answer = await call(executive, "vault.store", {"key": key, "data": ""})
        assert answer["error"] == "InvalidInput", key


async def test_similarity_search_ranks_by_cosine(executive: Executive) -> None:
    vectors = {
        "north": [0.0, 1.0],
        "east": [1.0, 0.0],
        "north-east": [1.0, 1.0],
        "south": [0.0, -1.0],
        "three-d": [1.0, 0.0, 0.0],
    }
    for key, vector in vectors.items():
        await call(
            executive,
            "vault.store",
            {"key": key, "data": b64(key.encode()), "metadata": {"name": key}, "embedding": vector},
        )
    found = await call(executive, "similarity.search", {"vector": [0.1, 1.0], "k": 3})
    assert [m["key"] for m in found["matches"]] == ["north", "north-east", "east"]
    assert found["matches"][0]["metadata"] == {"name": "north"}
    assert found["matches"][0]["score"] == pytest.approx(0.995, abs=0.001)
    positive = await call(executive, "similarity.search", {"vector": [0.0, 1.0], "min_score": 0.5})
    assert [m["key"] for m in positive["matches"]] == ["north", "north-east"]
    assert (await call(executive, "similarity.search", {"vector": [1.0] * 7}))["matches"] == []
    await call(executive, "vault.delete", {"key": "north"})  # the index follows writes
    after = await call(executive, "similarity.search", {"vector": [0.0, 1.0], "k": 1})
    assert [m["key"] for m in after["matches"]] == ["north-east"]
    elsewhere = await call(executive, "similarity.search", {"vector": [0.0, 1.0]}, "triage")
    assert elsewhere["matches"] == []


async def test_the_index_follows_stores_and_deletes_without_reading_the_vault_again(
    executive: Executive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once built, a namespace's index takes each write's embedding in hand: no store or
    delete makes the next search decrypt every blob again."""
    reads: list[str] = []
    read_all = Vault.blobs_with_embeddings

    def counted(vault: Vault, namespace: str) -> Any:
        reads.append(namespace)
        return read_all(vault, namespace)

    monkeypatch.setattr(Vault, "blobs_with_embeddings", counted)
    await call(executive, "vault.store", {"key": "old", "data": "", "embedding": [1.0, 0.0]})
    first = await call(executive, "similarity.search", {"vector": [1.0, 0.0]})
    assert [m["key"] for m in first["matches"]] == ["old"] and reads == ["claims"]
    await call(
        executive,
        "vault.store",
        {"key": "new", "data": "", "metadata": {"n": 1}, "embedding": [0.0, 2.0]},
    )
    found = await call(executive, "similarity.search", {"vector": [0.0, 1.0], "k": 1})
    assert found["matches"] == [{"key": "new", "score": 1.0, "metadata": {"n": 1}}]
    assert reads == ["claims"]
    await call(executive, "vault.store", {"key": "old", "data": ""})  # now without embedding
    await call(executive, "vault.delete", {"key": "new"})
    gone = await call(executive, "similarity.search", {"vector": [0.0, 1.0]})
    assert gone["matches"] == [] and reads == ["claims"]
    await call(executive, "vault.store", {"key": "3d", "data": "", "embedding": [0.0, 0.0, 1.0]})
    other = await call(executive, "similarity.search", {"vector": [0.0, 0.5, 1.0], "k": 1})
    assert [m["key"] for m in other["matches"]] == ["3d"] and reads == ["claims"]


async def test_a_store_whose_caller_went_away_still_reaches_the_index(
    executive: Executive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller cancelled while the vault's thread writes (a client that gave up) never
    learns the outcome, nor does the index from it: the next search reads the vault again."""
    entered, release = threading.Event(), threading.Event()
    put = Vault.put_blob

    def held(vault: Vault, *args: Any) -> int:
        entered.set()
        release.wait(10)
        return put(vault, *args)

    await call(executive, "vault.store", {"key": "old", "data": "", "embedding": [1.0, 0.0]})
    assert len((await call(executive, "similarity.search", {"vector": [1.0, 0.0]}))["matches"]) == 1
    monkeypatch.setattr(Vault, "put_blob", held)
    store = asyncio.create_task(
        call(executive, "vault.store", {"key": "new", "data": "", "embedding": [0.0, 1.0]})
    )
    await asyncio.to_thread(entered.wait, 10)
    store.cancel()
    with pytest.raises(asyncio.CancelledError):
        await store
    release.set()  # the write completes after its caller has gone
    found = await call(executive, "similarity.search", {"vector": [0.0, 1.0], "k": 1})
    assert [m["key"] for m in found["matches"]] == ["new"]


async def test_one_poisoned_blob_never_breaks_a_shared_namespace(tmp_path: Path) -> None:
    """Blobs stored by an older version with NaN in their metadata (it let them in): each is
    reported on its own, and every runtime still lists, searches and reads the others."""
    write_v1_vault(
        tmp_path / "state",
        {
            ("shared", "good"): ({"kind": "form"}, [1.0, 0.0], b"fine"),
            ("shared", "poisoned"): ({"score": float("nan")}, [0.0, 1.0], b"bad"),
            ("shared", "huge"): ({}, [10**400, 1.0], b"beyond float32"),
        },
    )
    async with vault_executive(tmp_path, namespace="shared") as executive:
        bad = await call(executive, "vault.retrieve", {"key": "poisoned"}, "claims")
        assert bad["error"] == "RecordUnreadable" and "'poisoned'" in bad["message"]
        listing = await call(executive, "vault.list", {}, "triage")
        assert [i["key"] for i in listing["items"]] == ["good", "huge"]
        assert [(u["key"], u["error"]) for u in listing["unreadable"]] == [
            ("poisoned", "RecordUnreadable")
        ]
        found = await call(executive, "similarity.search", {"vector": [1.0, 0.0]}, "triage")
        assert [m["key"] for m in found["matches"]] == ["good"]
        assert sorted(u["key"] for u in found["unreadable"]) == ["huge", "poisoned"]
        good = await call(executive, "vault.retrieve", {"key": "good"}, "triage")
        assert base64.b64decode(good["data"]) == b"fine"
        assert await call(executive, "vault.delete", {"key": "poisoned"}) == {"deleted": True}
        assert (await call(executive, "vault.list", {}, "triage"))["unreadable"] == []


async def test_embeddings_beyond_float32_are_refused(executive: Executive) -> None:
    for vector in ([1e39, 0.0], [10**400, 1]):
        stored = await call(executive, "vault.store", {"key": "k", "data": "", "embedding": vector})
        assert stored["error"] == "InvalidInput" and stored["path"] == "$.embedding[0]"
        found = await call(executive, "similarity.search", {"vector": vector})
        assert found["error"] == "InvalidInput" and found["path"] == "$.vector[0]"


def test_over_the_wire_and_with_a_damaged_vault(tmp_path: Path) -> None:
    proc, target = start_sidecar(tmp_path, ["system", "vault"])
    try:
        with sdk.Client(target) as client:
            client.call("vault.store", {"key": "a", "data": b64(b"A"), "embedding": [1.0, 0.0]})
            assert base64.b64decode(client.call("vault.retrieve", {"key": "a"})["data"]) == b"A"
            hits = client.call("similarity.search", {"vector": [1.0, 0.1]})["matches"]
            assert [h["key"] for h in hits] == ["a"]
            with pytest.raises(sdk.OrganError) as missing:
                client.call("vault.retrieve", {"key": "zzz"})
            assert missing.value.kind == "NotFound"
        state = tmp_path / "state"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in state.iterdir())
    finally:
        assert proc.stop() == 0
    (tmp_path / "state" / "vault.db").write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        (tmp_path / "state" / f"vault.db{suffix}").unlink(missing_ok=True)
    proc, target = start_sidecar(tmp_path, ["system", "vault"])
    try:
        with sdk.Client(target) as client:
            with pytest.raises(sdk.OrganError) as damaged:
                client.call("vault.retrieve", {"key": "a"})
            assert damaged.value.kind == "VaultError"
            assert "vault.db cannot be used" in str(damaged.value)
            assert client.call("system.echo", {"still": "serving"}) == {"still": "serving"}
    finally:
        assert proc.stop() == 0


def test_the_sidecar_opens_one_vault_for_its_credentials_and_its_organ(tmp_path: Path) -> None:
    """The credential broker and the vault organ share the sidecar's one vault: one SQLite
    connection (one descriptor on vault.db), whichever of them used it first."""
    upstream = FakeUpstream()
    extra = f'[[credential]]\nname = "api"\nhosts = ["{upstream.url}"]\n'
    config = write_config(tmp_path / "soma.toml", f'[soma]\nstate_dir = "state"\n{extra}')
    set_secret(config, "api", "s3cret-value")
    proc, target = start_sidecar(tmp_path, ["system", "vault", "http"], extra)
    try:
        with sdk.Client(target) as client:
            request = {"url": f"{upstream.url}/v1/echo", "credential": "api"}
            assert client.call("http.request", request)["status"] == 200
            client.call("vault.store", {"key": "a", "data": b64(b"A")})
        database = tmp_path / "state" / "vault.db"
        descriptors = Path(f"/proc/{proc.pid}/fd")
        opened = [fd for fd in descriptors.iterdir() if _points_to(fd, database)]
        assert len(opened) == 1
    finally:
        assert proc.stop() == 0
        upstream.close()


def _points_to(link: Path, target: Path) -> bool:
    try:
        return Path(os.readlink(link)) == target
    except FileNotFoundError:  # a descriptor closed while listing
        return False


def test_the_sidecar_refuses_a_kek_others_can_read(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "kek").write_bytes(b"k" * 32)
    (state / "kek").chmod(0o644)
    config = tmp_path / "soma.toml"
    config.write_text(
        f'[soma]\nstate_dir = "state"\n[sidecar]\nsocket = "{tmp_path}/run/s.sock"\n'
        'organs = ["system", "vault"]\n'
    )
    proc = Process([SOMA, "sidecar", "--config", str(config)], tmp_path / "log")
    assert proc.wait() == 2
    assert "readable by others" in proc.output()
