"""The on-disk index: a folder holding the catalog (the truth) and the vector files derived from it.

    catalog.sqlite            items, their embeddings, failures, model identity, generation
    image.faiss, text.faiss   one vector file per modality, stamped with the generation
    writer.lock               held (flock) by the one process writing; holds its pid

The Store keeps the two in agreement: every write goes through `Store.write()`, which commits
the catalog first and then applies the same change to the in-memory vector indexes; `flush()`
saves those, stamped. A vector file that is missing, damaged or stale is rebuilt from the
catalog, never served: in memory by a reader, which says so in one line; on disk by a writer,
and every writing command ends by catching up any such file (`catch_up`), so that rerunning a
command a crash interrupted leaves the index consistent.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.errors import IndexLockedError, IndexNotFoundError, ModelMismatchError, StoreError
from indexer.models.identity import ModelId, sha256_file
from indexer.store import index_choice
from indexer.store.catalog import Catalog, Filters, NewCaption, NewImage, StoredImage, Writer
from indexer.store.vectors import (
    ADD_BLOCK,
    IndexSpec,
    TuningQueries,
    VectorIndex,
    read_spec,
    remove_files,
    rerank,
    training_size,
    tune,
    verify,
    write_atomically,
)

__all__ = [
    "MODALITIES",
    "Filters",
    "IndexSpec",
    "NewCaption",
    "NewImage",
    "Progress",
    "Store",
    "StoreStatus",
    "StoredImage",
    "is_under",
]

log = logging.getLogger("clipseek")

MODALITIES = ("image", "text")
CATALOG = "catalog.sqlite"
DECISIONS = "index-choice.json"  # why `auto` chose each kind, on the machine that measured it
EXACT_FILTER = 20_000  # filters matching at most this many items are searched exactly (~40 MB of embeddings at 512-d)

# A long rebuild reports (phase, done, total) as it goes, e.g. ("images: adding", 300_000, 1_000_000);
# a phase with nothing to count reports total 0.
Progress = Callable[[str, int, int], None]


def log_progress(phase: str, done: int, total: int) -> None:
    """Progress as log lines: a phase without a count as it starts; adding, a line per block when
    there are several (a small rebuild says nothing)."""
    if not total:
        log.info("%s", phase)
    elif total > ADD_BLOCK and done:
        log.info("%s: %s of %s (%.0f%%)", phase, f"{done:,}", f"{total:,}", 100 * done / total)


def _quiet(phase: str, done: int, total: int) -> None:
    """A reader's rebuild reports no progress: Store.vectors has said in one line why it rebuilds."""


@dataclass(frozen=True)
class StoreStatus:
    path: str
    model: ModelId | None
    index_type: str  # per modality: its vector file's kind, settings and measured recall
    generation: int
    updated_at: float | None
    counts: list[tuple[str, str | None, int]]  # (modality, collection, items)
    failures: int
    bytes_on_disk: dict[str, int]


class Store:
    """One index folder, opened for reading or (by one process at a time) for writing."""

    def __init__(self, root: Path, catalog: Catalog, lock: int | None):
        self.root = root
        self.catalog = catalog
        self._lock = lock
        self._vectors: dict[str, VectorIndex] = {}
        self._dirty: set[str] = set()
        self._seen_generation = catalog.generation()
        self._model_id: ModelId | None = None

    @classmethod
    def open(cls, root: str | os.PathLike, write: bool = False, create: bool = False) -> Store:
        root = Path(root)
        if not (root / CATALOG).is_file():
            if not create:
                raise IndexNotFoundError(f"no index at {root}: create one with `clipseek index FOLDER`")
            root.mkdir(parents=True, exist_ok=True)
        lock = _take_writer_lock(root) if write else None
        return cls(root, Catalog(root / CATALOG, readonly=not write), lock)

    def close(self) -> None:
        if self._lock is not None:
            self.flush()
        self.catalog.close()
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the model -------------------------------------------------------------------------

    @property
    def model_id(self) -> ModelId | None:
        """The model the index was made with; None until the first model is claimed."""
        if self._model_id is None:  # read once known: it never changes after that
            stored = self.catalog.get("model")
            self._model_id = ModelId.from_dict(json.loads(stored)) if stored else None
        return self._model_id

    @property
    def model_checkpoint(self) -> str | None:
        """The checkpoint path the model was loaded from, if it came from a file."""
        return self.catalog.get("model_checkpoint")

    def claim_model(self, model_id: ModelId, checkpoint: str | None) -> None:
        """Record the model of a new index; an index that has one only accepts the same."""
        stored = self.model_id
        if stored is None:
            with self.catalog.write() as writer:
                writer.set("model", model_id.to_dict())
                if checkpoint:
                    writer.set("model_checkpoint", str(Path(checkpoint).resolve()))
        elif stored != model_id:
            raise self.mismatch(model_id)

    def check_checkpoint(self, checkpoint: str | os.PathLike | None) -> None:
        """A checkpoint given for this index's model (say, moved) must hold its weights: same sha256."""
        stored = self.model_id
        if checkpoint is not None and stored is not None and sha256_file(checkpoint) != stored.checkpoint_sha256:
            raise self.mismatch(checkpoint)

    def mismatch(self, asked: object) -> ModelMismatchError:
        return ModelMismatchError(
            f"the index at {self.root} was made with {self.model_id}, not {asked}; "
            "leave out the model options to use its own model, or choose another --index"
        )

    # -- writing ---------------------------------------------------------------------------

    @contextmanager
    def write(self, index_vectors: bool = True) -> Iterator[StoreWriter]:
        """One catalog transaction; after it commits, the vector indexes get the same change.

        A bulk load passes index_vectors=False: only the catalog changes, so nothing is held in
        memory beyond the batch, and the vector files of the modalities it changed go stale, to be
        rebuilt from the catalog, as the kind that fits, by the next fit() or optimize().
        """
        with self.catalog.write() as writer:
            store_writer = StoreWriter(writer, self.vectors if index_vectors else None)
            yield store_writer
        if not index_vectors:
            for modality in writer.modalities:
                self._vectors.pop(modality, None)
                self._dirty.discard(modality)
            return
        for modality, (ids, vectors) in store_writer.added.items():
            self.vectors(modality).add(np.asarray(ids), np.stack(vectors))
            self._dirty.add(modality)
        if store_writer.removed:
            for modality in MODALITIES:  # removing an id a modality does not hold is a no-op
                self.vectors(modality).remove(store_writer.removed)
                self._dirty.add(modality)

    def flush(self) -> None:
        """Save the vector files that changed, stamped with the catalog generation."""
        generation = self.catalog.generation()
        for modality in sorted(self._dirty):
            self._vectors[modality].save(self._vector_path(modality), generation)
        self._dirty.clear()

    def remove(self, paths: list[str | os.PathLike] = (), collection: str | None = None) -> int:
        """Remove the pictures at or under `paths`, and the captions of `collection`; returns how many."""
        targets = [os.fsencode(os.path.abspath(path)) for path in paths]
        images = self.catalog.images()
        ids = [item.id for path, item in images.items() if is_under(path, targets)]
        with self.write() as writer:
            writer.delete_items(ids)
            removed = len(ids) + (writer.delete_collection(collection) if collection else 0)
        self.catch_up()
        return removed

    def refresh(self) -> None:
        """Drop what was loaded if another process committed since (for readers)."""
        generation = self.catalog.generation()
        if generation != self._seen_generation:
            self._vectors = {}
            self._seen_generation = generation

    # -- vectors ---------------------------------------------------------------------------

    def _vector_path(self, modality: str) -> Path:
        return self.root / f"{modality}.faiss"

    def holds(self, modality: str) -> bool:
        """Whether the vector index of a modality is in memory already (vectors() returns at once)."""
        return modality in self._vectors

    def vectors(self, modality: str) -> VectorIndex:
        """The vector index of a modality: its file when fresh and intact, else rebuilt from the catalog.

        A rebuild says why in one line (none for a modality that never had vectors). A writer
        saves the rebuilt index at its next flush and reports the rebuild's progress; a reader
        keeps it in memory only and reports none (a search's output is its hits).
        """
        if modality not in self._vectors:
            index, problem = self._load(modality)
            if index is None:
                if self._ever_stored(modality):
                    log.info("%s: %s; catching up from the catalog", self._vector_path(modality).name, problem)
                writer = self._lock is not None
                index = self._rebuild(modality, log_progress if writer else _quiet)
                if writer:
                    self._dirty.add(modality)
            self._vectors[modality] = index
        return self._vectors[modality]

    def catch_up(self) -> None:
        """Bring every vector file up to date with the catalog, rebuilding those that are missing,
        damaged or stale, and save what changed: the last step of every writing command, even one
        with nothing else to do, so that rerunning a command killed between its catalog commit and
        its vector files leaves them consistent. A file already held in memory is saved as it is."""
        for modality in MODALITIES:
            if modality not in self._vectors and self._ever_stored(modality):
                stamp, _ = verify(
                    self._vector_path(modality), self.catalog.vectors_changed(modality), self.catalog.generation()
                )
                if stamp is None:
                    self.vectors(modality)
        self.flush()

    def _ever_stored(self, modality: str) -> bool:
        """Whether a modality has a vector file to keep: one is on disk, or its vectors ever changed."""
        return self._vector_path(modality).exists() or self.catalog.vectors_changed(modality) > 0

    def _load(self, modality: str) -> tuple[VectorIndex | None, str]:
        changed = self.catalog.vectors_changed(modality)
        return VectorIndex.load(self._vector_path(modality), changed, self.catalog.generation())

    def _rebuild(self, modality: str, progress: Progress) -> VectorIndex:
        """A modality's vector index from the catalog, of the kind last chosen for it (flat when
        there are too few vectors left to train that kind)."""
        spec = IndexSpec.from_dict(json.loads(self.catalog.get(f"index_spec.{modality}") or "null"))
        count = self._counts()[modality]
        if not spec.exact and count < (spec.nlist or 0) * index_choice.MIN_PER_CLUSTER + 1:
            spec = IndexSpec()
        return self._build(modality, spec, count, progress)

    def _build(self, modality: str, spec: IndexSpec, count: int, progress: Progress) -> VectorIndex:
        """A vector index of `spec` over the catalog's embeddings of `modality`, streamed from it in
        blocks: memory holds the index and one block, never every embedding at once. IVF kinds
        are trained on a sample first; approximate kinds are then tuned (see vectors.tune).
        `count`, the modality's items, is for progress."""
        name = f"{modality}s"
        training, queries = None, None
        if not spec.exact:
            ids, training = self.catalog.vector_sample(modality, max(training_size(spec), 200))
            queries = TuningQueries.drawn(ids, training)
            progress(f"{name}: training {spec.kind}" if spec.nlist else f"{name}: building {spec.kind}", 0, 0)
        index = VectorIndex.empty(self.model_id.dim, spec, training)
        del training
        done = 0
        if count:  # a first write builds an empty index: nothing to say
            progress(f"{name}: adding", 0, count)
        for ids, vectors in self.catalog.vector_blocks(modality, ADD_BLOCK):
            index.add(ids, vectors)
            if queries is not None:
                queries.update(ids, vectors)
            done += len(ids)
            progress(f"{name}: adding", done, max(count, done))
        if queries is None or not done:
            return index
        target = spec.target or index_choice.RECALL
        progress(f"{name}: tuning to recall@10 ≥ {target:g}", 0, 0)
        return tune(index, queries, self.catalog.embeddings_of, target)

    def _counts(self) -> dict[str, int]:
        """Items per modality (one scan of the catalog: seconds at ten million items)."""
        counts = dict.fromkeys(MODALITIES, 0)
        for modality, _, count in self.catalog.counts():
            counts[modality] += count
        return counts

    # -- searching -------------------------------------------------------------------------

    def nearest(
        self, modality: str, vector: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k items of `modality` (among `allowed`) nearest to `vector`: (ids, cosine similarities), best first.

        Approximate kinds give candidates, re-ranked by the exact cosine of the catalog's
        embeddings, so scores are always true similarities. A filter matching up to
        EXACT_FILTER items is answered exactly from their embeddings (cheaper than a filtered
        graph or cluster walk, and never short); a wider one through the index, topped up
        exactly when it comes back short. So a filter never gives fewer than k hits when k
        items match.
        """
        index = self.vectors(modality)
        if not index.spec.exact and allowed is not None and len(allowed) <= EXACT_FILTER:
            return self._reranked(allowed, vector, k)
        scores, ids = index.search(vector[None, :], index.candidates(k), allowed)
        found, scores = ids[0][ids[0] >= 0], scores[0][ids[0] >= 0]
        if index.spec.exact:
            return found, _cosine(scores)
        if len(found) < min(k, index.count if allowed is None else len(allowed)):
            found = allowed if allowed is not None else index.ids()
        return self._reranked(found, vector, k)

    def _reranked(self, ids: np.ndarray, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found, vectors = self.catalog.embeddings_of(ids)
        if not len(found):
            return found, np.zeros(0, np.float32)
        found, scores = rerank(vector, found, vectors, k)
        return found, _cosine(scores)

    def index_setting(
        self, kind: str | None = None, budget: int | None = None, latency_ms: float | None = None
    ) -> tuple[str, int, float]:
        """The index type, memory budget and latency budget this index keeps to (default auto,
        4 GiB, 10 ms); given ones are remembered."""
        setting = json.loads(self.catalog.get("index_setting") or "{}")
        given = (("kind", kind), ("budget", budget), ("latency_ms", latency_ms))
        asked = {key: value for key, value in given if value is not None}
        if asked and {**setting, **asked} != setting:
            index_choice.check_kind(asked.get("kind", "auto"))
            setting = {**setting, **asked}
            with self.catalog.write() as writer:
                writer.set("index_setting", setting)
        return (
            setting.get("kind", "auto"),
            setting.get("budget", index_choice.DEFAULT_BUDGET),
            setting.get("latency_ms", index_choice.DEFAULT_LATENCY_MS),
        )

    def fit(self, progress: Progress = log_progress) -> dict[str, IndexSpec]:
        """Rebuild the vector files that are stale (after a bulk load) or whose kind no longer fits:
        exact search got slower than the latency budget on this machine (or faster again), or the
        index type or budgets changed. What fits already is left alone (`optimize` retunes it); a
        kind that cannot be built yet (too few vectors, too small a budget) is said, and the files
        stay as they are."""
        kind, budget, latency = self.index_setting()
        counts = self._counts()
        plan = {}
        for modality, count in counts.items():
            current = self._vectors.get(modality) or self._load(modality)[0]
            if current is not None:
                self._vectors[modality] = current
            elif not count:
                continue
            was = current.spec.kind if current is not None else None
            try:
                spec, decision = index_choice.choose(count, self.model_id.dim, kind, budget, latency, was)
            except StoreError as error:
                progress(f"{modality}s: {error}; the vector file stays {was or 'as last built'}", 0, 0)
                continue
            self._note_decision(modality, decision)
            if spec.kind != was:
                plan[modality] = spec
        return self._rebuild_as(plan, counts, progress)

    def optimize(
        self,
        kind: str = "auto",
        budget: int = index_choice.DEFAULT_BUDGET,
        progress: Progress = log_progress,
        latency_ms: float = index_choice.DEFAULT_LATENCY_MS,
    ) -> dict[str, IndexSpec]:
        """Rebuild each modality's vector file as the kind that fits it now (index_choice.choose),
        tuned to its recall target; the old file serves readers until the new one replaces it."""
        counts = self._counts()
        plan = {}
        for modality, count in counts.items():
            if count:
                plan[modality], decision = index_choice.choose(count, self.model_id.dim, kind, budget, latency_ms)
                self._note_decision(modality, decision)
        return self._rebuild_as(plan, counts, progress)

    def _rebuild_as(
        self, plan: dict[str, IndexSpec], counts: dict[str, int], progress: Progress
    ) -> dict[str, IndexSpec]:
        chosen = {}
        for modality, spec in plan.items():
            self._vectors.pop(modality, None)  # the old index's memory, free for the new one
            index = self._build(modality, spec, counts[modality], progress)
            with self.catalog.write() as writer:  # first: a rebuild after a crash makes this kind again
                writer.set(f"index_spec.{modality}", index.spec.to_dict())
            self._vectors[modality] = index
            self._dirty.add(modality)
            self.flush()
            chosen[modality] = index.spec
        self.catch_up()  # a modality left with no items may still have a stale file
        return chosen

    def _note_decision(self, modality: str, decision: index_choice.Decision | None) -> None:
        """Why `auto` chose each kind, for `status`: a file beside the vector files rather than a
        catalog row, since it belongs to the machine that measured it (and a commit would wake
        every reader)."""
        path = self.root / DECISIONS
        try:
            noted = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            noted = {}
        noted[modality] = decision.to_dict() if decision else None
        write_atomically(path, json.dumps(noted, sort_keys=True).encode())

    def decisions(self) -> dict[str, index_choice.Decision]:
        """The decisions `auto` last noted, by modality (none where a kind was asked for)."""
        try:
            noted = json.loads((self.root / DECISIONS).read_text(encoding="utf-8"))
            return {modality: index_choice.Decision(**value) for modality, value in noted.items() if value}
        except (OSError, ValueError, TypeError):
            return {}

    def check(self) -> list[str]:
        """Everything that disagrees between catalog and vector files; empty when consistent."""
        problems = self.catalog.integrity_problems()
        for modality in MODALITIES:
            path = self._vector_path(modality)
            ids = np.sort(self.catalog.matching_ids(modality, Filters()))
            if not len(ids) and not path.exists():
                continue
            index, problem = self._load(modality)
            if index is None:
                problems.append(f"{path.name}: {problem}")
            elif not np.array_equal(np.sort(index.ids()), ids):
                problems.append(f"{path.name}: its ids differ from the catalog's {modality} items")
        return problems

    def repair(self) -> None:
        """Rebuild every vector file from the catalog."""
        for modality in MODALITIES:
            remove_files(self._vector_path(modality))
            self._vectors[modality] = self._rebuild(modality, log_progress)
            self._dirty.add(modality)
        self.flush()

    def status(self) -> StoreStatus:
        sizes = {}
        for name in (CATALOG, CATALOG + "-wal", "image.faiss", "text.faiss"):
            if (self.root / name).exists():
                sizes[name] = (self.root / name).stat().st_size
        updated = self.catalog.get("updated_at")
        decisions = self.decisions()
        return StoreStatus(
            path=str(self.root),
            model=self.model_id,
            index_type=", ".join(
                f"{modality}s {read_spec(self._vector_path(modality)).describe()}"
                + (f"; {decisions[modality].describe()}" if modality in decisions else "")
                for modality in MODALITIES
                if self._vector_path(modality).exists()
            )
            or "flat (exact search)",
            generation=self.catalog.generation(),
            updated_at=float(updated) if updated else None,
            counts=self.catalog.counts(),
            failures=self.catalog.failure_count(),
            bytes_on_disk=sizes,
        )


class StoreWriter:
    """The changes of one Store.write() transaction, mirrored into the vector indexes on commit."""

    def __init__(self, writer: Writer, vector_index: Callable[[str], VectorIndex] | None):
        self._writer = writer
        # A modality's vector index is loaded (or rebuilt from the catalog, which does not yet
        # see this transaction) before its first change, so the change is applied exactly once.
        # None: a bulk load, which leaves the vector files to be rebuilt.
        self._load_vectors = vector_index or (lambda modality: None)
        self._bulk = vector_index is None
        self.added: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        self.removed: list[int] = []

    def _added(self, modality: str, ids: list[int], vectors: list[np.ndarray]) -> list[int]:
        if not ids or self._bulk:
            return ids
        known_ids, known_vectors = self.added.setdefault(modality, ([], []))
        known_ids.extend(ids)
        known_vectors.extend(vectors)
        return ids

    def add_images(self, images: list[NewImage]) -> list[int]:
        if images:
            self._load_vectors("image")
        return self._added("image", self._writer.add_images(images), [image.vector for image in images])

    def add_captions(self, collection: str, captions: list[NewCaption]) -> list[int]:
        if captions:
            self._load_vectors("text")
        return self._added("text", self._writer.add_captions(collection, captions), [c.vector for c in captions])

    def delete_items(self, ids: list[int]) -> None:
        if ids:
            for modality in MODALITIES:
                self._load_vectors(modality)
        self._writer.delete_items(ids)
        self.removed.extend(ids)

    def delete_collection(self, collection: str) -> int:
        ids = self._writer.collection_ids(collection)
        self.delete_items(ids)
        return len(ids)

    def move_image(self, item_id: int, path: bytes, size: int, mtime_ns: int) -> None:
        self._writer.move_image(item_id, path, size, mtime_ns)

    def touch_image(self, item_id: int, size: int, mtime_ns: int) -> None:
        self._writer.touch_image(item_id, size, mtime_ns)

    def record_failure(self, path: bytes, reason: str, size: int | None, mtime_ns: int | None) -> None:
        self._writer.record_failure(path, reason, size, mtime_ns)

    def forget_failures(self, paths: list[bytes]) -> None:
        self._writer.forget_failures(paths)


def _cosine(scores: np.ndarray) -> np.ndarray:
    """Scores as cosine similarities, within [-1, 1]: float32 inner products of unit vectors round
    a hair past them (an item found by its own vector scores 1.0000002), which a caller comparing
    with 1 or printing a percentage should never see."""
    return np.clip(scores, -1.0, 1.0)


def _take_writer_lock(root: Path) -> int:
    """flock on writer.lock: one writer at a time, released by the OS even on kill -9."""
    descriptor = os.open(root / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(descriptor)
        raise IndexLockedError(
            f"the index at {root} is being written by process {holder}; wait for it to finish"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, str(os.getpid()).encode(), 0)
    return descriptor


def is_under(path: bytes, roots: Iterable[bytes]) -> bool:
    """Whether `path` is one of `roots` or inside one of them."""
    return any(path == root or path.startswith(root.rstrip(b"/") + b"/") for root in roots)
