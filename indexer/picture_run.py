"""One run of the Indexer over the pictures that are new or changed: hash each file, decode and
preprocess the ones whose content is not known (in a pool of processes, or threads for short
runs: indexer.sources.decode_pool; JPEGs on the GPU where torch embeds on CUDA), embed them a batch
at a time and commit each batch, with its moves, copies and failures, as one transaction.
The report says how long the run waited on each stage (indexer.stage_times).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.errors import BadFileError
from indexer.models import devices
from indexer.models.pixels import Preprocess
from indexer.sources.decode_pool import DecodePool
from indexer.sources.pictures import VANISHED, FileEntry, JpegHeader, file_hash, jpeg_header, prepare_picture
from indexer.stage_times import StageTimes
from indexer.store import NewImage, StoredImage

if TYPE_CHECKING:
    from indexer.pipeline import Indexer

__all__ = ["IndexReport", "PictureRun"]


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


class PictureRun:
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
