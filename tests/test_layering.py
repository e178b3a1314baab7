"""The import arrows of docs/architecture.md's code layout point one way, and nobody imports
another package's private modules: the SDK imports neither the core nor the sidecar, the core
imports neither the sidecar nor gRPC, the sidecar uses the SDK only through its public
`sdk.protocol`, and only the CLI (the top floor) imports from everything."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("sdk", "soma_runtime", "sidecar", "soma_cli", "soma_bench")
# What each package may import of the project's packages (by prefix), beside itself.
ALLOWED = {
    "sdk": (),
    "soma_runtime": ("sdk.protocol",),
    "sidecar": ("soma_runtime", "sdk.protocol"),
    "soma_cli": ("soma_runtime", "sidecar", "sdk.protocol", "soma_bench"),  # the top floor
    # The benchmark measures the SDK as an agent uses it, so it imports the public `sdk`.
    "soma_bench": ("soma_runtime", "sidecar", "sdk"),
}
# Third-party packages each may not import at all.
FORBIDDEN = {
    "sdk": ("pydantic", "cryptography", "mcp", "starlette", "uvicorn", "structlog", "jsonschema"),
    "soma_runtime": ("grpc", "grpc_health", "grpc_reflection", "google", "cryptography", "mcp"),
    "sidecar": (),
    "soma_cli": (),
    "soma_bench": (),
}


def imports(package: str) -> Iterator[tuple[Path, str]]:
    """Every module each file of `package` imports, wherever the import statement is."""
    for path in sorted((REPO / package).rglob("*.py")):
        if "protocol/soma" in path.as_posix():  # generated stubs
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    yield path, f"{node.module}.{alias.name}"


def owner(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in PACKAGES else None


def test_imports_point_one_way() -> None:
    wrong = []
    for package in PACKAGES:
        for path, module in imports(package):
            other = owner(module)
            if other in (None, package):
                continue
            if not module.startswith(ALLOWED[package]):
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert wrong == []


def test_no_private_module_of_another_package_is_imported() -> None:
    wrong = []
    for package in PACKAGES:
        for path, module in imports(package):
            other = owner(module)
            if (
                other not in (None, package)
                and any(
                    part.startswith("_") and not part.endswith("__")  # dunders are public
                    for part in module.split(".")[1:]
                )
            ):
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert wrong == []


def test_heavy_or_server_libraries_stay_out_of_where_they_do_not_belong() -> None:
    wrong = []
    for package in PACKAGES:
        for path, module in imports(package):
            if module.split(".")[0] in FORBIDDEN[package]:
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert wrong == []
