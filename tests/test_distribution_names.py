"""No first-party distribution shares a name with a project on the package index.

A pin such as `soma-runtime-sdk==0.1.0` is satisfied by whatever the index holds under that name:
if a stranger's project holds it, a plain `pip install` of ours installs their code (issue 14:
`soma-sdk` 0.1.0 on the index is an unrelated compiled extension). We have never published, so
any release under one of our names is someone else's.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO

# The PEP 691 JSON form of the Simple API, which PyPI and the usual mirrors speak.
_ACCEPT = "application/vnd.pypi.simple.v1+json"
_INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def ours(filename: str) -> list[Path]:
    """Every `filename` in the repository's own tree: not in virtualenvs, caches or installed
    node modules."""
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "node_modules")
        if filename in files:
            found.append(Path(root, filename))
    return found


def first_party() -> list[tuple[str, str]]:
    """(name, version) of every distribution this repository builds."""
    found = []
    for path in ours("pyproject.toml"):
        project = tomllib.loads(path.read_text())["project"]
        found.append((project["name"], project["version"]))
    return found


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def index_files(name: str) -> list[str] | None:
    """The file names the index holds for `name`; None when it holds no such project."""
    request = urllib.request.Request(f"{_INDEX}/{normalized(name)}/", headers={"Accept": _ACCEPT})
    try:
        with urllib.request.urlopen(request, timeout=15) as reply:
            page = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        pytest.skip(f"the package index at {_INDEX} answered {exc.code}; names not checked")
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        pytest.skip(f"the package index at {_INDEX} is unreachable ({exc}); names not checked")
    return [entry["filename"] for entry in page.get("files", [])]


def test_every_first_party_distribution_is_checked() -> None:
    names = dict(first_party())
    assert names == {"soma-runtime": "0.1.0", "soma-runtime-sdk": "0.1.0"}
    root = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert f"soma-runtime-sdk=={names['soma-runtime-sdk']}" in root["dependencies"]


@pytest.mark.parametrize(("name", "version"), first_party())
def test_the_index_holds_no_project_under_our_name(name: str, version: str) -> None:
    files = index_files(name)
    if files is None:
        return
    same = [f for f in files if f"-{version}-" in f or f.endswith(f"-{version}.tar.gz")]
    pytest.fail(
        f"the package index holds a project named {name!r} ({len(files)} files"
        f"{', among them ' + ', '.join(same[:3]) if same else ''}): `pip install` would take "
        "a stranger's package for ours; rename the distribution"
    )


def test_npm_packages_of_ours_are_private() -> None:
    """Our package.json files (examples, test fixtures) are never published: `private` makes
    npm refuse to."""
    manifests = ours("package.json")
    assert manifests
    for path in manifests:
        assert json.loads(path.read_text()).get("private") is True, path
