"""The `vault` organ: encrypted blobs with metadata, and the `similarity` sub-organ.

Blobs are sealed in the vault database like secrets (envelope encryption, one data key per
blob). Each runtime has its own namespace by default (`[organ.vault] namespace = "runtime"`);
`namespace = "shared"` lets runtimes see each other's blobs. Embeddings stored with blobs are
encrypted at rest too; `similarity.search` keeps a decrypted, normalised matrix per namespace
in the sidecar's memory, rebuilt after writes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from sidecar.vault.async_vault import AsyncVault
from sidecar.vault.open import open_vault
from sidecar.vault.store import Blob, BlobInfo, BlobPage, Unreadable, Vault, VaultError
from soma_runtime import (
    FunctionCard,
    OrganCard,
    OrganEnvironment,
    OrganFailure,
    ResidencyPolicy,
    RoutedOrgan,
    SloConfig,
    Stimulus,
)
from soma_runtime import function as organ_function

VERSION = "0.1.0"
KEY_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,254}$"
MAX_METADATA_BYTES = 16 * 1024
MAX_DIMENSIONS = 4096
# The similarity index holds float32: a component beyond its range would become inf there.
FLOAT32_MAX = float(np.finfo(np.float32).max)
LOCAL_NAMESPACE = "local"

_KEY = {
    "type": "string",
    "pattern": KEY_PATTERN,
    "description": "Letters, digits, '.', '_' and '-'; no '..'; at most 255 characters.",
}
_METADATA = {"type": "object", "description": "Key-value metadata, at most 16 KiB as JSON."}
_VECTOR = {
    "type": "array",
    "items": {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX},
    "minItems": 1,
    "maxItems": MAX_DIMENSIONS,
}
_UNREADABLE = {
    "type": "array",
    "description": (
        "Blobs that did not open (tampered, rolled back, removed outside the vault, or not "
        "JSON inside), each with its key, error kind and message; the others are unaffected."
    ),
    "items": {
        "type": "object",
        "properties": {
            "key": {"type": "string"},
            "error": {"type": "string"},
            "message": {"type": "string"},
        },
        "required": ["key", "error", "message"],
    },
}

_STORE = FunctionCard(
    name="vault.store",
    description=(
        "Store a blob under a key with optional metadata and embedding, encrypted at rest. "
        "Replaces the blob already under that key. Returns the stored size and revision."
    ),
    tags=["write", "storage", "encryption", "blob"],
    examples=[
        "Store a scanned claim form under its claim id",
        "Archive an encrypted document with tags in its metadata",
        "Save a text chunk with its embedding for later similarity search",
    ],
    input_schema={
        "type": "object",
        "properties": {
            "key": _KEY,
            "data": {"type": "string", "description": "Base64-encoded blob data."},
            "metadata": _METADATA,
            "embedding": {**_VECTOR, "description": "Optional vector for similarity.search."},
        },
        "required": ["key", "data"],
        "additionalProperties": False,
    },
    output_schema={
        "type": "object",
        "properties": {
            "stored": {"const": True},
            "key": {"type": "string"},
            "revision": {"type": "integer", "minimum": 1},
            "size_bytes": {"type": "integer", "minimum": 0},
        },
        "required": ["stored", "key", "revision", "size_bytes"],
    },
    slo=SloConfig(p95_latency_ms=50, max_error_rate=0.001, queue_cap=1000),
    residency=ResidencyPolicy.LOCAL,
    idempotent=True,
    side_effects=["overwrites the blob under the key on disk", "updates the similarity index"],
)

_RETRIEVE = FunctionCard(
    name="vault.retrieve",
    description=(
        "Retrieve a blob by its key, decrypted. Returns the data (base64), its metadata, "
        "size and revision; NotFound when there is no such key."
    ),
    tags=["read", "storage", "decryption", "blob"],
    examples=[
        "Fetch the claim form stored under a claim id",
        "Load an archived document to summarise it",
        "Read back a configuration blob saved earlier",
    ],
    input_schema={
        "type": "object",
        "properties": {"key": _KEY},
        "required": ["key"],
        "additionalProperties": False,
    },
    output_schema={
        "type": "object",
        "properties": {
            "key": {"type": "string"},
            "data": {"type": "string"},
            "metadata": {"type": "object"},
            "size_bytes": {"type": "integer"},
            "revision": {"type": "integer"},
            "updated_at": {"type": "string"},
        },
        "required": ["key", "data", "metadata", "size_bytes", "revision", "updated_at"],
    },
    slo=SloConfig(p95_latency_ms=30, max_error_rate=0.001, queue_cap=2000),
    residency=ResidencyPolicy.LOCAL,
    idempotent=True,
    side_effects=["reads from disk"],
)

_DELETE = FunctionCard(
    name="vault.delete",
    description="Delete the blob under a key. Returns whether there was one to delete.",
    tags=["delete", "storage", "blob"],
    examples=["Remove a document the user asked to forget", "Delete a stale cache entry"],
    input_schema={
        "type": "object",
        "properties": {"key": _KEY},
        "required": ["key"],
        "additionalProperties": False,
    },
    output_schema={
        "type": "object",
        "properties": {"deleted": {"type": "boolean"}},
        "required": ["deleted"],
    },
    slo=SloConfig(p95_latency_ms=50, max_error_rate=0.001, queue_cap=1000),
    residency=ResidencyPolicy.LOCAL,
    idempotent=True,
    side_effects=["deletes the blob under the key from disk", "updates the similarity index"],
)

_LIST = FunctionCard(
    name="vault.list",
    description=(
        "List stored blobs in key order with their sizes and metadata, optionally only keys "
        "starting with a prefix. Pages with `after` (the last key of the previous page). "
        "Blobs that do not open are reported one by one in `unreadable`."
    ),
    tags=["read", "list", "storage", "blob"],
    examples=[
        "List every claim stored for this agent",
        "Page through documents whose key starts with 2026-",
    ],
    input_schema={
        "type": "object",
        "properties": {
            "prefix": {"type": "string", "maxLength": 255},
            "after": {"type": "string", "maxLength": 255},
            "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
        },
        "additionalProperties": False,
    },
    output_schema={
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "key": {"type": "string"},
                        "size_bytes": {"type": "integer"},
                        "revision": {"type": "integer"},
                        "updated_at": {"type": "string"},
                        "metadata": {"type": "object"},
                    },
                    "required": ["key", "size_bytes", "revision", "updated_at", "metadata"],
                },
            },
            "unreadable": _UNREADABLE,
            "next_after": {"type": "string", "description": "Present when there may be more."},
        },
        "required": ["items", "unreadable"],
    },
    slo=SloConfig(p95_latency_ms=100, max_error_rate=0.001, queue_cap=200),
    residency=ResidencyPolicy.LOCAL,
    idempotent=True,
    side_effects=["reads from disk"],
)

_SEARCH = FunctionCard(
    name="similarity.search",
    description=(
        "Find the stored blobs whose embeddings are most similar to a query vector (cosine "
        "similarity, top k). Returns keys, scores and metadata, best first."
    ),
    tags=["search", "vector", "similarity", "read"],
    examples=[
        "Find documents similar to a reference text's embedding",
        "Discover related claims by comparing their embeddings",
    ],
    input_schema={
        "type": "object",
        "properties": {
            "vector": _VECTOR,
            "k": {"type": "integer", "minimum": 1, "maximum": 100},
            "min_score": {"type": "number", "minimum": -1, "maximum": 1},
        },
        "required": ["vector"],
        "additionalProperties": False,
    },
    output_schema={
        "type": "object",
        "properties": {
            "matches": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "key": {"type": "string"},
                        "score": {"type": "number"},
                        "metadata": {"type": "object"},
                    },
                    "required": ["key", "score", "metadata"],
                },
            },
            "unreadable": _UNREADABLE,
        },
        "required": ["matches", "unreadable"],
    },
    slo=SloConfig(p95_latency_ms=50, max_error_rate=0.001, queue_cap=500),
    residency=ResidencyPolicy.LOCAL,
    idempotent=True,
    side_effects=[],
)


class BlobStore:
    """The state both organs share: the vault and the per-namespace similarity matrices."""

    def __init__(self) -> None:
        self.vault: AsyncVault | None = None
        self.shared = False
        self.max_blob_bytes = 1024 * 1024
        self._indexes: dict[str, _Index] = {}

    def namespace(self, stimulus: Stimulus) -> str:
        return "shared" if self.shared else (stimulus.caller or LOCAL_NAMESPACE)

    async def run(self, fn: Any, *args: Any) -> Any:
        assert self.vault is not None, "the organ was not started"
        try:
            return await self.vault.run(fn, *args)
        except VaultError as exc:
            raise OrganFailure(exc.kind, str(exc)) from None

    def invalidate(self, namespace: str) -> None:
        self._indexes.pop(namespace, None)

    async def index(self, namespace: str) -> _Index:
        index = self._indexes.get(namespace)
        if index is None:
            index = _Index(await self.run(Vault.blobs_with_embeddings, namespace))
            self._indexes[namespace] = index
        return index


class _Index:
    """Normalised embeddings grouped by dimension, for cosine similarity as one product;
    and the blobs that could not be indexed, which every search reports."""

    def __init__(self, page: BlobPage) -> None:
        self.unreadable = [_unreadable(u) for u in page.unreadable]
        by_dim: dict[int, list[tuple[BlobInfo, np.ndarray[Any, Any]]]] = {}
        for blob in page.items:
            vector = _in_float32_range(blob.embedding)
            if vector is None:  # stored before inputs were bounded to float32's range
                self.unreadable.append(
                    {
                        "key": blob.key,
                        "error": "RecordUnreadable",
                        "message": f"blob {blob.key!r}: its embedding is beyond float32's range",
                    }
                )
                continue
            by_dim.setdefault(len(vector), []).append((blob, vector))
        self._groups = {
            dim: (
                _normalised(np.array([v for _, v in group], dtype=np.float32)),
                [b for b, _ in group],
            )
            for dim, group in by_dim.items()
        }

    def search(self, vector: list[float], k: int, min_score: float) -> list[dict[str, Any]]:
        group = self._groups.get(len(vector))
        if group is None:
            return []
        matrix, blobs = group
        query = _normalised(np.array([vector], dtype=np.float32))[0]
        scores = matrix @ query
        top = np.argsort(-scores)[:k]
        return [
            {
                "key": blobs[i].key,
                "score": round(float(scores[i]), 6),
                "metadata": blobs[i].metadata,
            }
            for i in top
            if scores[i] >= min_score
        ]


def _in_float32_range(embedding: list[float] | None) -> np.ndarray[Any, Any] | None:
    try:
        vector = np.array(embedding, dtype=np.float64)
    except OverflowError:  # an integer beyond even float64
        return None
    return vector if bool(np.all(np.abs(vector) <= FLOAT32_MAX)) else None


def _unreadable(entry: Unreadable) -> dict[str, str]:
    return {"key": entry.key, "error": entry.kind, "message": entry.message}


def _normalised(matrix: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0  # a zero vector matches nothing (score 0) instead of dividing by 0
    normalised: np.ndarray[Any, Any] = matrix / norms
    return normalised


class Similarity(RoutedOrgan):
    """The `similarity` sub-organ: reached as `similarity.search` through `vault`."""

    card = OrganCard(
        name="similarity",
        version=VERSION,
        description="Vector similarity search over the embeddings stored with vault blobs.",
        division="storage",
        subsystem="vault",
        tags=["search", "vector", "similarity"],
        execution_modes=["sidecar"],
        functions=[],
    )

    def __init__(self, store: BlobStore) -> None:
        self._store = store

    @organ_function(_SEARCH)
    async def search(self, input: dict[str, Any], stimulus: Stimulus) -> dict[str, Any]:
        index = await self._store.index(self._store.namespace(stimulus))
        matches = index.search(input["vector"], input.get("k", 5), input.get("min_score", -1.0))
        return {"matches": matches, "unreadable": index.unreadable}


class VaultOrgan(RoutedOrgan):
    """Encrypted blob storage with metadata and vector similarity search."""

    card = OrganCard(
        name="vault",
        version=VERSION,
        description=(
            "Secure storage vault organ for encrypted blob management with metadata and "
            "vector similarity search."
        ),
        division="storage",
        subsystem="vault",
        tags=["storage", "vault", "encryption", "blob", "metadata", "vector-search"],
        execution_modes=["sidecar"],
        functions=[],
        author="Soma Runtime",
        repository="https://github.com/soma-runtime/soma-runtime",
    )

    def __init__(self) -> None:
        self._store = BlobStore()
        self.sub_organs = (Similarity(self._store),)
        self._env: OrganEnvironment | None = None

    def configure(self, settings: Mapping[str, Any], env: OrganEnvironment) -> None:
        """`namespace = "runtime" | "shared"`, `max_blob_bytes` (default 1 MiB)."""
        unknown = set(settings) - {"namespace", "max_blob_bytes"}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        namespace = settings.get("namespace", "runtime")
        if namespace not in ("runtime", "shared"):
            raise ValueError("namespace must be 'runtime' or 'shared'")
        limit = settings.get("max_blob_bytes", self._store.max_blob_bytes)
        if not isinstance(limit, int) or not 1 <= limit <= 64 * 1024 * 1024:
            raise ValueError("max_blob_bytes must be an integer from 1 to 67108864")
        self._store.shared = namespace == "shared"
        self._store.max_blob_bytes = limit
        self._env = env

    async def start(self) -> None:
        env = self._env
        if env is None or env.config is None:
            raise RuntimeError("the vault organ needs the sidecar's configuration")
        config = env.config
        self._store.vault = AsyncVault(lambda: open_vault(config, durable=False))

    async def stop(self) -> None:
        if self._store.vault is not None:
            await self._store.vault.close()

    @organ_function(_STORE)
    async def store(self, input: dict[str, Any], stimulus: Stimulus) -> dict[str, Any]:
        try:
            data = base64.b64decode(input["data"], validate=True)
        except (binascii.Error, ValueError):
            raise OrganFailure("InvalidInput", "data is not valid base64", path="$.data") from None
        if len(data) > self._store.max_blob_bytes:
            raise OrganFailure(
                "TooLarge",
                f"blobs are limited to {self._store.max_blob_bytes} bytes",
                path="$.data",
            )
        metadata = input.get("metadata", {})
        if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
            raise OrganFailure("TooLarge", "metadata is limited to 16 KiB", path="$.metadata")
        namespace = self._store.namespace(stimulus)
        revision = await self._store.run(
            Vault.put_blob, namespace, input["key"], data, metadata, input.get("embedding")
        )
        self._store.invalidate(namespace)
        return {"stored": True, "key": input["key"], "revision": revision, "size_bytes": len(data)}

    @organ_function(_RETRIEVE)
    async def retrieve(self, input: dict[str, Any], stimulus: Stimulus) -> dict[str, Any]:
        blob: Blob | None = await self._store.run(
            Vault.get_blob, self._store.namespace(stimulus), input["key"]
        )
        if blob is None:
            raise OrganFailure("NotFound", "no blob under that key", key=input["key"])
        return {
            "key": blob.key,
            "data": base64.b64encode(blob.data).decode(),
            "metadata": blob.metadata,
            "size_bytes": blob.size_bytes,
            "revision": blob.revision,
            "updated_at": blob.updated_at,
        }

    @organ_function(_DELETE)
    async def delete(self, input: dict[str, Any], stimulus: Stimulus) -> dict[str, Any]:
        namespace = self._store.namespace(stimulus)
        deleted = await self._store.run(Vault.delete_blob, namespace, input["key"])
        self._store.invalidate(namespace)
        return {"deleted": deleted}

    @organ_function(_LIST)
    async def list(self, input: dict[str, Any], stimulus: Stimulus) -> dict[str, Any]:
        limit = input.get("limit", 100)
        found: BlobPage = await self._store.run(
            Vault.list_blobs,
            self._store.namespace(stimulus),
            input.get("prefix", ""),
            input.get("after", ""),
            limit,
        )
        items = [
            {
                "key": i.key,
                "size_bytes": i.size_bytes,
                "revision": i.revision,
                "updated_at": i.updated_at,
                "metadata": i.metadata,
            }
            for i in found.items
        ]
        page: dict[str, Any] = {
            "items": items,
            "unreadable": [_unreadable(u) for u in found.unreadable],
        }
        keys = [i.key for i in found.items] + [u.key for u in found.unreadable]
        if len(keys) == limit:
            page["next_after"] = max(keys)
        return page
