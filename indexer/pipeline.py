"""The Indexer: loader → encoder → store, batched, overlapped, incremental and resumable.

A run walks the folders (only stat calls), compares what it finds with the catalog, and works
only on what changed: a file with a known size and modification time is left alone; a new or
changed file is hashed, and reuses a stored embedding when its content is already known (a
moved, renamed or copied picture); only the rest is decoded, by workers that overlap the model,
and embedded (indexer.picture_run). Each batch commits as one transaction, so a crash loses at
most one batch; the files that disappeared leave the index only after the walk is complete
(mark, walk, sweep).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from indexer.config import IndexSettings, ListSource, RaySettings, index_dir, index_location
from indexer.errors import ClipseekError
from indexer.models import backend, devices, hub
from indexer.models.backend import encoder_for
from indexer.models.identity import DEFAULT_MODEL
from indexer.picture_run import IndexReport, PictureRun
from indexer.sources.captions import read_captions
from indexer.sources.pictures import FileEntry, walk
from indexer.store import NewCaption, Store, is_under

if TYPE_CHECKING:
    from indexer.models.encoder import Encoder
    from indexer.models.onnx_encoder import OnnxEncoder


@dataclass
class CaptionReport:
    collection: str
    rows: int = 0
    added: int = 0
    duplicates: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    seconds: float = 0.0


class Indexer:
    """Indexes folders and caption files into a Store opened for writing.

    `encoder` is a callable that loads the model: it is called only when something has to be
    embedded, so a rescan of an unchanged library never loads torch. `device`: the device asked
    for, which Ray's model actors place themselves (see indexer.models.devices); `placement`: where
    `encoder` embeds, which sets how many workers decode (IndexSettings.decoding_threads) and whether
    JPEGs decode on the GPU (IndexSettings.gpu_jpegs).
    """

    def __init__(
        self,
        store: Store,
        encoder: Callable[[], Encoder | OnnxEncoder],
        settings: IndexSettings | None = None,
        device: str = "auto",
        placement: devices.Placement = devices.CPU,
    ):
        self.store = store
        self.device = device
        self.placement = placement
        self._load_encoder = encoder
        self._encoder: Encoder | OnnxEncoder | None = None
        self._encoder_lock = threading.Lock()  # decoding workers may be the first to need it
        self.settings = settings or IndexSettings()

    @classmethod
    def open(
        cls,
        index: str | os.PathLike | None = None,
        model: str | None = None,
        pretrained: str | None = None,
        checkpoint: str | os.PathLike | None = None,
        settings: IndexSettings | None = None,
        offline: bool | None = None,
        device: str = "auto",
    ) -> Indexer:
        """Open (or create) an index for writing, with its model, to embed on `device` ("auto",
        "cpu", "cuda", "cuda:N", "mps"; see indexer.models.devices).

        A new index loads the model asked for (default ViT-B-32 / laion2b_s34b_b79k), downloading
        its weights once where they are missing unless `offline` (None: CLIPSEEK_OFFLINE or
        HF_HUB_OFFLINE say), and remembers it; when that fails, the index folder this call made
        is removed again. Where the model cache holds the model's export, its identity is read
        from there instead, without torch. An existing index reloads its own model when it first
        needs it, as does a new one of an exported model; asking for another model is a
        ModelMismatchError.
        """
        placement = devices.place(device)  # a device that is not there fails before anything is made
        root = index_dir(index)
        made = not root.exists()
        store = Store.open(index_location(index), write=True, create=True)
        try:
            stored = store.model_id
            if stored is None:
                hub.prepare(model, pretrained, checkpoint, offline=offline)  # fails fast, before torch
                known = backend.exported_model(model, pretrained, checkpoint)
                if known is None:
                    from indexer.models.encoder import load_encoder  # torch: only where a model is needed

                    encoder = load_encoder(
                        model or DEFAULT_MODEL, pretrained, checkpoint, device="cpu", offline=offline
                    )
                    store.claim_model(encoder.model_id, os.fspath(checkpoint) if checkpoint else None)
                    # The ONNX export is made now (traced on the CPU), before the model moves to its device.
                    embedder = backend.load(encoder.model_id, lambda: encoder, placement=placement)
                    return cls(store, lambda: embedder, settings, device, placement)
                store.claim_model(known, os.fspath(checkpoint) if checkpoint else None)
            else:
                for asked, has in ((model, stored.architecture), (pretrained, stored.pretrained)):
                    if asked is not None and asked != has:
                        raise store.mismatch(asked)
                store.check_checkpoint(checkpoint)
        except BaseException:
            store.close()
            if made:  # nothing but this failed run is in it: no index without a model is left behind
                shutil.rmtree(root, ignore_errors=True)
            raise

        return cls(store, lambda: encoder_for(store, checkpoint, offline, placement), settings, device, placement)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Indexer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def encoder(self) -> Encoder | OnnxEncoder:
        with self._encoder_lock:
            if self._encoder is None:
                self._encoder = self._load_encoder()
            return self._encoder

    def index(
        self,
        roots: Iterable[str | os.PathLike],
        progress: Callable[[int, int], None] | None = None,
        stop: threading.Event | None = None,
        ray: RaySettings | None = None,
        report: IndexReport | None = None,
    ) -> IndexReport:
        """Bring the index up to date with the pictures under `roots`.

        `progress(done, total)` is called as files needing work are done (`report`, when given,
        is the one filled in as the run goes: a progress bar reads its stage times); `stop`, when set,
        ends the run after the current batch with everything so far committed. A run that
        completes rebuilds the vector files whose kind the collection outgrew (Store.fit); every
        run, even an interrupted one, ends with the vector files caught up with the catalog
        (Store.catch_up).

        With `ray`, the pictures to embed go through a Ray Data pipeline into shards, which are
        then ingested (indexer.ray.pipeline, indexer.ray.shards), and the vector files are built
        once at the end. Moved and copied pictures are embedded again there rather than
        recognised, and `stop` is not looked at until the shards are ingested.
        """
        started = time.monotonic()
        roots = [os.fsencode(os.path.abspath(root)) for root in roots]
        for root in roots:
            if not os.path.exists(root):
                # Never sweep a folder that is only missing for now (an unplugged disk).
                raise ClipseekError(f"{os.fsdecode(root)} does not exist; nothing was changed")
        report = report if report is not None else IndexReport()
        if ray is not None:  # shards a killed run left: in the catalog before the walk compares with it
            self._ingest_shards(report, progress)
        stored = self.store.catalog.images()
        known_failures = self.store.catalog.failures()
        walk_failures: list[tuple[bytes, str]] = []
        seen: set[bytes] = set()
        todo: list[FileEntry] = []
        for entry in walk(roots, on_error=lambda path, reason: walk_failures.append((path, reason))):
            seen.add(entry.path)
            item = stored.get(entry.path)
            if item and (item.size, item.mtime_ns) == (entry.size, entry.mtime_ns):
                report.unchanged += 1
            elif known_failures.get(entry.path) == (entry.size, entry.mtime_ns):
                report.known_failures += 1
            else:
                todo.append(entry)
        report.found = len(seen)
        missing = {path: item for path, item in stored.items() if path not in seen and is_under(path, roots)}
        gone = [path for path in known_failures if path not in seen and is_under(path, roots)]
        if gone or walk_failures:
            with self.store.write() as writer:
                writer.forget_failures(gone)
                for path, reason in walk_failures:  # folders that could not be read
                    writer.record_failure(path, reason, None, None)
                    report.failures.append((os.fsdecode(path), reason))
            report.failed += len(walk_failures)
        if ray is None:
            PictureRun(self, report, stored, missing).process(todo, progress, stop)
        else:
            self._embed_on_ray(todo, ray, report, progress)
        if missing and not report.interrupted:
            with self.store.write(index_vectors=ray is None) as writer:
                writer.delete_items([item.id for item in missing.values()])
            report.removed += len(missing)
        self.store.flush()
        if not report.interrupted:
            self.store.fit()  # the collection may have outgrown its vector index kind
        self.store.catch_up()  # what a killed run left stale, whatever this one changed
        report.seconds = time.monotonic() - started
        return report

    def _embed_on_ray(self, todo: list[FileEntry], settings: RaySettings, report: IndexReport, progress) -> None:
        ray_pipeline, shards = _ray_modules()
        if todo:
            model = ray_pipeline.ModelSource(self.store.model_id, self.store.model_checkpoint, self.device)
            ray_pipeline.embed(todo, model, self.encoder.preprocess, shards.shard_dir(self.store), settings)
        self._ingest_shards(report, progress)

    def index_list(
        self, source: ListSource, ray: RaySettings, progress: Callable[[int, int], None] | None = None
    ) -> IndexReport:
        """Index the pictures named by lists (URLs, object-store URIs or paths, with captions) or
        held by WebDataset shards, on Ray (indexer.ray.pipeline.embed_list); each picture's
        caption joins an image→text collection. A picture indexed or failed before, by its name,
        is not read again; nothing is removed."""
        started = time.monotonic()
        report = IndexReport()
        ray_pipeline, shards = _ray_modules()
        self._ingest_shards(report, progress)  # what a killed run left
        known = set(self.store.catalog.images()) | set(self.store.catalog.failures())
        model = ray_pipeline.ModelSource(self.store.model_id, self.store.model_checkpoint, self.device)
        ray_pipeline.embed_list(source, known, model, self.encoder.preprocess, shards.shard_dir(self.store), ray)
        self._ingest_shards(report, progress)
        report.found = report.embedded + report.failed
        self.store.fit()
        self.store.catch_up()
        report.seconds = time.monotonic() - started
        return report

    def _ingest_shards(self, report: IndexReport, progress) -> None:
        _, shards = _ray_modules()
        ingested = shards.ingest(self.store, progress)
        report.embedded += ingested.added
        report.failed += ingested.failed
        report.failures += ingested.failures
        report.captions += ingested.captions

    def add_captions(
        self, path: str | os.PathLike, collection: str, file_format: str | None = None, batch_size: int = 256
    ) -> CaptionReport:
        """Embed a caption file into `collection`; exact duplicates are stored once."""
        started = time.monotonic()
        parsed = read_captions(path, file_format)
        report = CaptionReport(collection, rows=len(parsed.rows), problems=parsed.problems)
        known = self.store.catalog.captions(collection)
        fresh = []
        for row in parsed.rows:
            if row.caption in known:
                report.duplicates += 1
            else:
                known.add(row.caption)
                fresh.append(row)
        for start in range(0, len(fresh), batch_size):
            rows = fresh[start : start + batch_size]
            vectors = self.encoder.embed_texts([row.caption for row in rows])
            captions = [NewCaption(r.caption, r.ref, r.image, v) for r, v in zip(rows, vectors, strict=True)]
            with self.store.write() as writer:
                writer.add_captions(collection, captions)
            report.added += len(rows)
        self.store.flush()
        self.store.fit()
        self.store.catch_up()
        report.seconds = time.monotonic() - started
        return report


def _ray_modules():
    """indexer.ray.pipeline and indexer.ray.shards, which need the `ray` extra (Ray Data, pyarrow)."""
    try:
        from indexer.ray import pipeline as ray_pipeline
        from indexer.ray import shards
    except ModuleNotFoundError as error:
        raise ClipseekError(
            f"--ray needs Ray Data, and {error.name} is not installed: pip install 'clipseek[ray]'"
        ) from None
    return ray_pipeline, shards
