"""Fuzz the configuration loader with random, mutated and ill-typed TOML files.

`load_config` may succeed or raise `ConfigError` whose message names the file and, for a file
that parses, the key at fault. Any other exception (a `TypeError` from a model validator, a
`RecursionError`, an `OSError` from resolving a path) would reach the operator as a stack trace.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import example, given
from hypothesis import strategies as st

from soma_runtime.config import ConfigError, load_config
from tests.attack import tally
from tests.attack.scale import fuzz_settings
from tests.attack.strategies import Bytes, mutated_bytes
from tests.helpers import REPO

SEEDS = [(REPO / "soma.toml").read_bytes(), (REPO / "examples" / "gateway.toml").read_bytes()]
# What the models know: the sections, their keys, and the keys of the array tables.
SECTIONS = {
    "soma": ["state_dir", "runtime_dir"],
    "logging": ["level", "format"],
    "sidecar": ["socket", "organs", "max_message_bytes", "max_input_depth", "grace_period"],
    "vault": ["kek", "kek_file", "credential"],
}
TABLES = {
    "runtime": ["name", "command", "allow", "credentials", "gateways", "env", "cwd", "restart"],
    "credential": ["name", "secret", "inject", "hosts"],
    "gateway": ["name", "upstream", "credential", "base_url_env", "api_key_env", "timeout"],
}
# The dotted key (any TOML key name, "" included), then the problem.
KEY_AT_FAULT = re.compile(r"^(.+: |unknown key)", re.DOTALL)

TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),  # nan and inf are TOML too
    st.text(max_size=30),
    st.sampled_from(["system", "vault", "http", "always", "file", "..", "/", "~", "x:y"]),
)
TOML_VALUES: st.SearchStrategy[Any] = st.recursive(
    TOML_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def typed_documents(draw: st.DrawFn) -> bytes:
    """Documents with the real sections and keys, holding values of any type."""
    document: dict[str, Any] = {}
    for section, keys in SECTIONS.items():
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(keys), max_size=3, unique=True))
            document[section] = {key: draw(TOML_VALUES) for key in chosen}
    for table, keys in TABLES.items():
        if draw(st.booleans()):
            entries = []
            for _ in range(draw(st.integers(1, 2))):
                chosen = draw(st.lists(st.sampled_from(keys), max_size=5, unique=True))
                entries.append({key: draw(TOML_VALUES) for key in chosen})
            document[table] = entries
    if draw(st.booleans()):
        document[draw(st.text(max_size=8))] = draw(TOML_VALUES)
    return tomli_w.dumps(document).encode()


DOCUMENTS = st.one_of(
    typed_documents(),
    st.sampled_from(SEEDS).flatmap(mutated_bytes),
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
).map(Bytes)


@fuzz_settings(short=300, long=20000)
@given(raw=DOCUMENTS)
@example(raw=Bytes(b"[sidecar]\nsocket = '\x00'\n"))
@example(raw=Bytes(b"[soma]\nstate_dir = '~nosuchuser/x'\n"))
@example(raw=Bytes(b"x = " + b"[" * 3000 + b"]" * 3000 + b"\n"))
def test_any_config_file_loads_or_names_the_key_at_fault(
    tmp_path_factory: pytest.TempPathFactory, raw: Bytes
) -> None:
    tally.count("fuzz", "config files")
    path = tmp_path_factory.getbasetemp() / "fuzzed.toml"
    path.write_bytes(raw.data)
    try:
        config = load_config(path)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: "), message
        detail = message[len(f"{path}: ") :]
        if not detail.startswith(("not valid TOML", "not UTF-8")):
            assert KEY_AT_FAULT.match(detail), detail
        return
    # What the processes compute from a loaded file must not fail either.
    for child in (config.state_dir, config.runtime_dir, *(r.cwd for r in config.runtime)):
        if isinstance(child, Path):
            config.resolve(child)
