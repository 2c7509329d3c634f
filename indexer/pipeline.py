"""The Indexer: loader → encoder → store, batched, overlapped, incremental and resumable.

A run walks the folders (only stat calls), compares what it finds with the catalog, and works
only on what changed: a file with a known size and modification time is left alone; a new or
changed file is hashed, and reuses a stored embedding when its content is already known (a
moved, renamed or copied picture); only the rest is decoded, by workers (processes, or threads
for short runs: indexer.sources.decode_pool) that overlap the model, and embedded. The report
says how long the run waited on each stage, and so which one held it back (indexer.stage_times).
Each batch commits as one transaction, so a crash loses at most one batch; the files that
disappeared leave the index only after the walk is complete (mark, walk, sweep).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.config import IndexSettings, ListSource, RaySettings, index_dir, index_location
from indexer.errors import BadFileError, ClipseekError
from indexer.models import backend, devices, hub
from indexer.models.backend import encoder_for
from indexer.models.identity import DEFAULT_MODEL
from indexer.models.pixels import Preprocess
from indexer.sources.captions import read_captions
from indexer.sources.decode_pool import DecodePool
from indexer.sources.pictures import VANISHED, FileEntry, JpegHeader, file_hash, jpeg_header, prepare_picture, walk
from indexer.stage_times import StageTimes
from indexer.store import NewCaption, NewImage, Store, StoredImage, is_under

if TYPE_CHECKING:
    from indexer.models.encoder import Encoder
    from indexer.models.onnx_encoder import OnnxEncoder


@dataclass
class IndexReport:
    """What an indexing run did; `failures` lists this run's new failures as (path, reason)."""

    found: int = 0
    unchanged: int = 0
    embedded: int = 0
    reused: int = 0  # new paths whose content was already indexed (copies), not decoded
    moved: int = 0
    removed: int = 0
    failed: int = 0
    known_failures: int = 0  # failed before and unchanged since: not tried again
    captions: int = 0  # a list's captions, added to its collection
    device: str | None = None  # where pictures were embedded, when some were: "cuda:0 (torch, float16)"
    decoders: str | None = None  # what decoded this run's pictures, when some were: "4 processes", "2 threads"
    interrupted: bool = False
    seconds: float = 0.0
    stages: StageTimes = field(default_factory=StageTimes)  # where the time went; stages.bottleneck
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def pictures_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


@dataclass
class CaptionReport:
    collection: str
    rows: int = 0
    added: int = 0
    duplicates: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    seconds: float = 0.0


@dataclass
class _Work:
    """One new or changed file, after a worker has looked at it."""

    entry: FileEntry
    sha256: str | None = None
    pixels: Any = None  # the model's input tensor, when the file had to be decoded
    jpeg: JpegHeader | None = None  # a JPEG left for the GPU to decode, with its batch
    width: int = 0
    height: int = 0
    taken_at: str | None = None
    failure: str | None = None


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
        is removed again. An existing index reloads its own model when it first needs it; asking
        for another model is a ModelMismatchError.
        """
        placement = devices.place(device)  # a device that is not there fails before anything is made
        root = index_dir(index)
        made = not root.exists()
        store = Store.open(index_location(index), write=True, create=True)
        try:
            stored = store.model_id
            if stored is None:
                hub.prepare(model, pretrained, checkpoint, offline=offline)  # fails fast, before torch
                from indexer.models.encoder import load_encoder  # torch: only where a model is needed

                encoder = load_encoder(model or DEFAULT_MODEL, pretrained, checkpoint, device="cpu", offline=offline)
                store.claim_model(encoder.model_id, os.fspath(checkpoint) if checkpoint else None)
                # The ONNX export is made now (traced on the CPU), before the model moves to its device.
                embedder = backend.load(encoder.model_id, lambda: encoder, placement=placement)
                return cls(store, lambda: embedder, settings, device, placement)
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
            _Run(self, report, stored, missing).process(todo, progress, stop)
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


class _Run:
    """The state of one index run: pending changes, committed in batches."""

    def __init__(self, indexer: Indexer, report: IndexReport, stored: dict[bytes, StoredImage], missing: dict):
        self.indexer = indexer
        self.store = indexer.store
        self.report = report
        self.stored = stored
        self.missing = missing
        self.pending: list[_Work] = []

    def _load_hashes(self) -> None:
        """Content hashes, needed only when some file is new or changed."""
        self.hashes = self.store.catalog.image_hashes()
        self.known_hashes = set(self.hashes.values())
        self.missing_by_hash: dict[str, list[StoredImage]] = {}
        for item in self.missing.values():
            self.missing_by_hash.setdefault(self.hashes[item.id], []).append(item)

    def process(self, todo: list[FileEntry], progress, stop: threading.Event | None) -> None:
        if not todo:
            return
        self._load_hashes()
        settings = self.indexer.settings
        self.side = self.store.model_id.side
        workers = settings.decoding_threads(self.indexer.placement.gpu)
        self.decoders = DecodePool(workers).start() if settings.decode_in_processes(len(todo)) else None
        self.decoding_threads: set[int] = set()
        self.jpegs = self._gpu_jpegs_wanted()
        self.jpeg_decoder = None
        self.on_gpu = 0  # pictures decoded there
        # With processes, each thread hashes and then waits on one: twice as many keep them all busy.
        threads = 2 * workers if self.decoders else workers
        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="clipseek-decode") as pool:
                self._consume(pool, todo, progress, stop)
        finally:
            if self.decoders:
                self.decoders.close()
        used = len(self.decoders.used) if self.decoders else len(self.decoding_threads)
        if used:
            kind = ("process" if self.decoders else "thread") + ("" if used == 1 else "es" if self.decoders else "s")
            self.report.decoders = f"{used} {kind}"
        if self.on_gpu:
            where = f"{self.report.decoders} and " if self.report.decoders else ""
            self.report.decoders = f"{where}{self.jpeg_decoder.device} ({self.on_gpu} JPEGs)"

    def _gpu_jpegs_wanted(self) -> bool:
        """IndexSettings.gpu_jpegs, or by default: where torch embeds on CUDA (ONNX Runtime takes arrays)."""
        placement = self.indexer.placement
        wanted = self.indexer.settings.gpu_jpegs
        if wanted is None:
            return placement.runtime == devices.TORCH and placement.device.startswith("cuda")
        return wanted

    def _consume(self, pool: ThreadPoolExecutor, todo: list[FileEntry], progress, stop) -> None:
        """Take the workers' results in order and commit them a batch at a time."""
        batch_size = self.indexer.settings.batch_size
        done = 0
        looked = _ordered(pool, self._look, todo, 4 * batch_size)
        while True:
            with self.report.stages.timing("decode"):  # the time spent waiting for the decoders
                work = next(looked, None)
            if work is None:
                break
            self.pending.append(work)
            done += 1
            if len(self.pending) >= batch_size:
                self._commit()
                if progress:
                    progress(done, len(todo))
                if stop is not None and stop.is_set():
                    self.report.interrupted = True
                    pool.shutdown(cancel_futures=True)
                    break
        if not self.report.interrupted:
            self._commit()
        if progress:
            progress(done, len(todo))

    def _look(self, entry: FileEntry) -> _Work:
        """In a worker thread: hash the file; decode and preprocess it unless its content is known."""
        work = _Work(entry)
        try:
            work.sha256 = file_hash(entry.path)
            if work.sha256 not in self.known_hashes:  # else a move, a copy or a touch
                self._decode(work)
        except BadFileError as error:
            work.failure = str(error)
        return work

    def _decode(self, work: _Work, on_cpu: bool = False) -> None:
        entry = work.entry
        if self.jpegs and not on_cpu and (header := jpeg_header(entry.path, entry.mtime_ns)) is not None:
            work.jpeg = header  # decoded on the GPU with its batch (_decode_jpegs)
            return
        preprocess = self.indexer.encoder.pixel_preprocess
        if self.decoders is not None:
            prepared = self.decoders.prepare(entry.path, entry.mtime_ns, self.side, preprocess)
        else:
            prepared = prepare_picture(entry.path, entry.mtime_ns, self.side, preprocess)
            self.decoding_threads.add(threading.get_ident())
        work.pixels, work.width, work.height, work.taken_at = prepared

    def _commit(self) -> None:
        """Embed the pending batch and commit it, with its moves, copies and failures, as one transaction."""
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        report = self.report
        self._decode_jpegs(batch)
        started = time.perf_counter()
        embedding = report.stages.embed
        with self.store.write() as writer:
            for work in batch:
                old = self.stored.get(work.entry.path)
                if work.failure is None and old is not None and self.hashes[old.id] == work.sha256:
                    writer.touch_image(old.id, work.entry.size, work.entry.mtime_ns)  # same content, new time
                    report.unchanged += 1
                    continue
                if old is not None:
                    writer.delete_items([old.id])  # changed content: the old embedding goes
                candidates = self.missing_by_hash.get(work.sha256) if work.failure is None else None
                if candidates:
                    moved = candidates.pop()
                    del self.missing[moved.path]
                    writer.move_image(moved.id, work.entry.path, work.entry.size, work.entry.mtime_ns)
                    report.moved += 1
                elif work.failure is None and work.pixels is None:
                    self._copy_or_decode(work, writer)
            decoded = [work for work in batch if work.failure is None and work.pixels is not None]
            with report.stages.timing("embed"):
                vectors = self.indexer.encoder.embed_preprocessed([w.pixels for w in decoded]) if decoded else []
            if decoded and report.device is None:  # the run's one device, recorded with its first pictures
                report.device = self.indexer.encoder.runs_on
                writer.record_device(report.device)
            ids = writer.add_images([_new_image(work, vector) for work, vector in zip(decoded, vectors, strict=True)])
            stored = sum(item is not None for item in ids)  # None: another writer (PostgreSQL) stored it first
            report.embedded += stored
            report.unchanged += len(decoded) - stored
            self.known_hashes.update(work.sha256 for work in decoded)
            for work in batch:
                if work.failure is not None and work.failure != VANISHED:
                    writer.record_failure(work.entry.path, work.failure, work.entry.size, work.entry.mtime_ns)
                    report.failed += 1
                    report.failures.append((os.fsdecode(work.entry.path), work.failure))
        report.stages.add("write", time.perf_counter() - started - (report.stages.embed - embedding))

    def _decode_jpegs(self, batch: list[_Work]) -> None:
        """The batch's JPEGs, decoded together on the GPU; those it cannot decode, on the CPU."""
        jpegs = [work for work in batch if work.jpeg is not None]
        if not jpegs:
            return
        with self.report.stages.timing("decode"):
            preprocess = self.indexer.encoder.pixel_preprocess
            if self.jpeg_decoder is None and isinstance(preprocess, Preprocess):
                from indexer.models.gpu_jpegs import GpuJpegs  # torch and torchvision: only here

                placement = self.indexer.placement  # ONNX Runtime takes arrays, which the CPU gives
                self.jpeg_decoder = GpuJpegs(
                    preprocess, placement.device if placement.runtime == devices.TORCH else "cpu"
                )
            headers = [work.jpeg for work in jpegs]
            prepared = self.jpeg_decoder.prepare(headers) if self.jpeg_decoder else [None] * len(jpegs)
            for work, header, pixels in zip(jpegs, headers, prepared, strict=True):
                work.jpeg = None
                if pixels is None:  # refused there: the CPU path decodes it, or says why not
                    try:
                        self._decode(work, on_cpu=True)
                    except BadFileError as error:
                        work.failure = str(error)
                    continue
                work.pixels, work.width, work.height, work.taken_at = (
                    pixels,
                    header.width,
                    header.height,
                    header.taken_at,
                )
                self.on_gpu += 1

    def _copy_or_decode(self, work: _Work, writer) -> None:
        """A new path with known content: reuse the stored embedding, or decode after all."""
        source = self.store.catalog.image_like(work.sha256)
        if source is None:  # its only copy left the index earlier in this run
            try:
                self._decode(work, on_cpu=True)  # the batch's JPEGs went to the GPU already
            except BadFileError as error:
                work.failure = str(error)
            return
        work.width, work.height, work.taken_at = source.width, source.height, source.taken_at
        writer.add_images([_new_image(work, source.vector)])
        self.report.reused += 1


def _new_image(work: _Work, vector: np.ndarray) -> NewImage:
    entry = work.entry
    return NewImage(entry.path, entry.size, entry.mtime_ns, work.sha256, work.width, work.height, work.taken_at, vector)


def _ordered(pool: ThreadPoolExecutor, function, items: list, window: int) -> Iterator:
    """pool.map, in order, with at most `window` tasks in flight (bounded memory)."""
    queue: deque[Future] = deque()
    source = iter(items)
    for item in source:
        queue.append(pool.submit(function, item))
        if len(queue) >= window:
            break
    while queue:
        result = queue.popleft().result()
        for item in source:
            queue.append(pool.submit(function, item))
            break
        yield result
