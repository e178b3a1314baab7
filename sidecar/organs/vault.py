"""The `vault` organ: encrypted blobs with metadata, and the `similarity` sub-organ.

Blobs are sealed in the vault database like secrets (envelope encryption, one data key per
blob). Each runtime has its own namespace by default (`[organ.vault] namespace = "runtime"`);
`namespace = "shared"` lets runtimes see each other's blobs. Embeddings stored with blobs are
encrypted at rest too; `similarity.search` keeps the decrypted, normalised vectors of each
namespace in the sidecar's memory, read from the vault once and then kept current by every
store and delete with the embedding already in hand.

The function schemas are derived from the typed dicts below (`schema_of`), and the handlers
take and return those typed dicts.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal, NotRequired

import numpy as np
from pydantic import ConfigDict, Field, with_config
from typing_extensions import TypedDict  # pydantic needs it for TypedDict on 3.11

from sidecar.vault.async_vault import AsyncVault
from sidecar.vault.store import Blob, BlobPage, Unreadable, Vault, VaultError
from soma_runtime import (
    FunctionCard,
    OrganCard,
    OrganEnvironment,
    OrganFailure,
    ResidencyPolicy,
    RoutedOrgan,
    SloConfig,
    Stimulus,
    schema_of,
)
from soma_runtime import function as organ_function

VERSION = "0.1.0"
KEY_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,254}$"
MAX_METADATA_BYTES = 16 * 1024
MAX_DIMENSIONS = 4096
FLOAT32_MAX = float(np.finfo(np.float32).max)
LOCAL_NAMESPACE = "local"

Key = Annotated[
    str,
    Field(
        pattern=KEY_PATTERN,
        description="Letters, digits, '.', '_' and '-'; no '..'; at most 255 characters.",
    ),
]
Metadata = Annotated[
    dict[str, Any], Field(description="Key-value metadata, at most 16 KiB as JSON.")
]
# The similarity index holds float32: a component beyond its range would become inf there.
Vector = Annotated[
    list[Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]],
    Field(min_length=1, max_length=MAX_DIMENSIONS),
]
# Inputs refuse fields they do not define (`additionalProperties: false`). Python's re
# compiles the key's look-ahead, which pydantic's default engine refuses; the executive's
# validator, not pydantic, checks inputs against the exported pattern.
_INPUT = ConfigDict(extra="forbid", regex_engine="python-re")


@with_config(_INPUT)
class StoreInput(TypedDict):
    key: Key
    data: Annotated[str, Field(description="Base64-encoded blob data.")]
    metadata: NotRequired[Metadata]
    embedding: NotRequired[
        Annotated[Vector, Field(description="Optional vector for similarity.search.")]
    ]


class StoreOutput(TypedDict):
    stored: Literal[True]
    key: str
    revision: Annotated[int, Field(ge=1)]
    size_bytes: Annotated[int, Field(ge=0)]


@with_config(_INPUT)
class KeyInput(TypedDict):
    key: Key


class BlobOutput(TypedDict):
    key: str
    data: str
    metadata: dict[str, Any]
    size_bytes: int
    revision: int
    updated_at: str


class DeleteOutput(TypedDict):
    deleted: bool


@with_config(_INPUT)
class ListInput(TypedDict):
    prefix: NotRequired[Annotated[str, Field(max_length=255)]]
    after: NotRequired[Annotated[str, Field(max_length=255)]]
    limit: NotRequired[Annotated[int, Field(ge=1, le=1000)]]


class ListItem(TypedDict):
    key: str
    size_bytes: int
    revision: int
    updated_at: str
    metadata: dict[str, Any]


class UnreadableBlob(TypedDict):
    key: str
    error: str
    message: str


Unreadables = Annotated[
    list[UnreadableBlob],
    Field(
        description=(
            "Blobs that did not open (tampered, rolled back, removed outside the vault, or "
            "not JSON inside), each with its key, error kind and message; the others are "
            "unaffected."
        )
    ),
]


class ListOutput(TypedDict):
    items: list[ListItem]
    unreadable: Unreadables
    next_after: NotRequired[Annotated[str, Field(description="Present when there may be more.")]]


@with_config(_INPUT)
class SearchInput(TypedDict):
    vector: Vector
    k: NotRequired[Annotated[int, Field(ge=1, le=100)]]
    min_score: NotRequired[Annotated[float, Field(ge=-1, le=1)]]


class Match(TypedDict):
    key: str
    score: float
    metadata: dict[str, Any]


class SearchOutput(TypedDict):
    matches: list[Match]
    unreadable: Unreadables


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
    input_schema=schema_of(StoreInput),
    output_schema=schema_of(StoreOutput),
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
    input_schema=schema_of(KeyInput),
    output_schema=schema_of(BlobOutput),
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
    input_schema=schema_of(KeyInput),
    output_schema=schema_of(DeleteOutput),
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
    input_schema=schema_of(ListInput),
    output_schema=schema_of(ListOutput),
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
    input_schema=schema_of(SearchInput),
    output_schema=schema_of(SearchOutput),
    slo=SloConfig(p95_latency_ms=50, max_error_rate=0.001, queue_cap=500),
    residency=ResidencyPolicy.LOCAL,
    idempotent=True,
    side_effects=[],
)


class BlobStore:
    """The state both organs share: the vault and the per-namespace similarity indexes."""

    def __init__(self) -> None:
        self.vault: AsyncVault | None = None
        self.shared = False
        self.max_blob_bytes = 1024 * 1024
        self._indexes: dict[str, _Index] = {}

    def namespace(self, stimulus: Stimulus) -> str:
        return "shared" if self.shared else (stimulus.caller or LOCAL_NAMESPACE)

    async def run(self, fn: Any, *args: Any) -> Any:
        assert self.vault is not None, "the organ was not configured"
        try:
            return await self.vault.run(fn, *args)
        except VaultError as exc:
            raise OrganFailure(exc.kind, str(exc)) from None

    async def write(self, namespace: str, fn: Any, *args: Any) -> Any:
        """Run a write whose effect on the index the caller applies when it returns (the
        vault's one thread runs calls in order, and each writer applies its effect as soon
        as its own call returns, so the index sees the writes in the vault's order). When it
        does not return (a failure, or a caller cancelled while the vault's thread may still
        run the write), the namespace's index is dropped: the next search reads it anew."""
        try:
            return await self.run(fn, *args)
        except BaseException:
            self._indexes.pop(namespace, None)
            raise

    def stored(
        self, namespace: str, key: str, metadata: dict[str, Any], embedding: list[float] | None
    ) -> None:
        """Keep a built index current after a store."""
        index = self._indexes.get(namespace)
        if index is not None:
            index.put(key, metadata, embedding)

    def deleted(self, namespace: str, key: str) -> None:
        index = self._indexes.get(namespace)
        if index is not None:
            index.remove(key)

    async def index(self, namespace: str) -> _Index:
        index = self._indexes.get(namespace)
        if index is None:
            index = _Index(await self.run(Vault.blobs_with_embeddings, namespace))
            self._indexes[namespace] = index
        return index


class _Index:
    """One namespace's normalised embeddings by key, and the blobs that could not be indexed
    (which every search reports). Searches use one matrix per dimension, for cosine similarity
    as one product; a write drops only the matrix of its dimension, rebuilt from memory."""

    def __init__(self, page: BlobPage) -> None:
        self._unreadable = {u.key: _unreadable(u) for u in page.unreadable}
        self._vectors: dict[str, tuple[dict[str, Any], np.ndarray[Any, Any]]] = {}
        self._matrices: dict[int, tuple[np.ndarray[Any, Any], list[str]]] = {}
        for blob in page.items:
            self.put(blob.key, blob.metadata, blob.embedding)

    @property
    def unreadable(self) -> list[UnreadableBlob]:
        return [self._unreadable[key] for key in sorted(self._unreadable)]

    def put(self, key: str, metadata: dict[str, Any], embedding: list[float] | None) -> None:
        self.remove(key)
        if not embedding:
            return
        vector = _in_float32_range(embedding)
        if vector is None:  # stored before inputs were bounded to float32's range
            self._unreadable[key] = {
                "key": key,
                "error": "RecordUnreadable",
                "message": f"blob {key!r}: its embedding is beyond float32's range",
            }
            return
        self._vectors[key] = (metadata, _normalised(vector.astype(np.float32)[np.newaxis])[0])
        self._matrices.pop(len(vector), None)

    def remove(self, key: str) -> None:
        self._unreadable.pop(key, None)
        entry = self._vectors.pop(key, None)
        if entry is not None:
            self._matrices.pop(len(entry[1]), None)

    def _matrix(self, dimensions: int) -> tuple[np.ndarray[Any, Any], list[str]]:
        found = self._matrices.get(dimensions)
        if found is None:
            keys = [k for k, (_, v) in self._vectors.items() if len(v) == dimensions]
            rows = [self._vectors[k][1] for k in keys]
            matrix = np.array(rows, dtype=np.float32).reshape(len(keys), dimensions)
            found = self._matrices[dimensions] = (matrix, keys)
        return found

    def search(self, vector: list[float], k: int, min_score: float) -> list[Match]:
        matrix, keys = self._matrix(len(vector))
        query = _normalised(np.array([vector], dtype=np.float32))[0]
        scores = matrix @ query
        top = np.argsort(-scores)[:k]
        return [
            {
                "key": keys[i],
                "score": round(float(scores[i]), 6),
                "metadata": self._vectors[keys[i]][0],
            }
            for i in top
            if scores[i] >= min_score
        ]


def _in_float32_range(embedding: list[float]) -> np.ndarray[Any, Any] | None:
    try:
        vector = np.array(embedding, dtype=np.float64)
    except OverflowError:  # an integer beyond even float64
        return None
    return vector if bool(np.all(np.abs(vector) <= FLOAT32_MAX)) else None


def _unreadable(entry: Unreadable) -> UnreadableBlob:
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
    async def search(self, input: SearchInput, stimulus: Stimulus) -> SearchOutput:
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

    def configure(self, settings: Mapping[str, Any], env: OrganEnvironment) -> None:
        """`namespace = "runtime" | "shared"`, `max_blob_bytes` (default 1 MiB); the blobs
        live in the host's vault (the sidecar opens it once, for every part that needs it)."""
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
        self._store.vault = env.service(AsyncVault)

    @organ_function(_STORE)
    async def store(self, input: StoreInput, stimulus: Stimulus) -> StoreOutput:
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
        namespace, embedding = self._store.namespace(stimulus), input.get("embedding")
        revision = await self._store.write(
            namespace, Vault.put_blob, namespace, input["key"], data, metadata, embedding
        )
        self._store.stored(namespace, input["key"], metadata, embedding)
        return {"stored": True, "key": input["key"], "revision": revision, "size_bytes": len(data)}

    @organ_function(_RETRIEVE)
    async def retrieve(self, input: KeyInput, stimulus: Stimulus) -> BlobOutput:
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
    async def delete(self, input: KeyInput, stimulus: Stimulus) -> DeleteOutput:
        namespace = self._store.namespace(stimulus)
        deleted = await self._store.write(namespace, Vault.delete_blob, namespace, input["key"])
        self._store.deleted(namespace, input["key"])
        return {"deleted": deleted}

    @organ_function(_LIST)
    async def list(self, input: ListInput, stimulus: Stimulus) -> ListOutput:
        limit = input.get("limit", 100)
        found: BlobPage = await self._store.run(
            Vault.list_blobs,
            self._store.namespace(stimulus),
            input.get("prefix", ""),
            input.get("after", ""),
            limit,
        )
        items: list[ListItem] = [
            {
                "key": i.key,
                "size_bytes": i.size_bytes,
                "revision": i.revision,
                "updated_at": i.updated_at,
                "metadata": i.metadata,
            }
            for i in found.items
        ]
        page: ListOutput = {
            "items": items,
            "unreadable": [_unreadable(u) for u in found.unreadable],
        }
        keys = [i.key for i in found.items] + [u.key for u in found.unreadable]
        if len(keys) == limit:
            page["next_after"] = max(keys)
        return page
