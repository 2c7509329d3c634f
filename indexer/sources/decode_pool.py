"""Decoding pictures on every core: a pool of processes beside the indexing process.

    pool = DecodePool(4).start()                                 # the processes start while the model loads
    prepared = pool.prepare(path, mtime_ns, side, preprocess)    # from any thread; BadFileError as prepare_picture
    pool.close()

Why processes: Pillow lets go of the interpreter's lock (the GIL) while libjpeg decodes and while
it resizes, but it takes the lock back for every 64 kB block it feeds the decoder, and opening
a file, reading its EXIF and turning pixels into the model's array hold it throughout. Measured
on a 2-core machine shared with other work: a pure-Python thread ran at 48% of its speed while
one thread decoded 4000 × 3000 phone JPEGs and at 66% while it decoded 1024 × 768 ones, so
decoding held the lock about half and a third of the time, and threads in one process cannot
use much more than two cores' worth of decoding. Decoding speed itself was hard to measure on
that machine (its load was about 8 on its 2 cores): on the small JPEGs, two threads gave 0.99,
0.99 and 0.70 times one thread's speed in three runs, two processes 1.30, 2.05 and 0.83 times.
tests/bench/gpu_check.py measures both with every core of a GPU machine.

Processes cost a start (a fresh interpreter importing Pillow and numpy, a fraction of a second,
begun with the run) and a copy of each picture's pixels back, so short runs decode in threads
(see IndexSettings).

Processes are spawned, not forked: a fork of a process whose torch or ONNX Runtime threads
hold locks can hang. They ignore Ctrl-C, which the indexing process turns into "stop after this
batch", and end within a second of the indexing process when it is killed. A decoder that
crashes its process (hostile bytes reaching a native decoder) breaks the pool: it is replaced,
and each picture that was in flight is decoded again alone, in a process of its own, so that
only the picture that crashes again is recorded as a failure.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from indexer.errors import BadFileError
from indexer.sources.pictures import Prepared, prepare_picture

__all__ = ["DecodePool"]

ORPHAN_CHECK_S = 1.0  # how often a worker looks whether the indexing process is still there


def _in_worker(parent: int) -> None:
    """A worker ignores Ctrl-C, and ends when the indexing process has ended: one killed (kill -9,
    out of memory) cannot tell its workers, which would otherwise wait for work forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_end_when_orphaned, args=(parent,), daemon=True).start()


def _end_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_S)
    os._exit(1)


def _ready() -> None:
    """Nothing: submitted once per worker so that each starts (and imports Pillow) at once."""


def _prepare(path: bytes, mtime_ns: int | None, side: int, preprocess: Callable) -> tuple[int, Prepared]:
    """In a worker process: the picture prepared, and which process prepared it."""
    return os.getpid(), prepare_picture(path, mtime_ns, side, preprocess)


class DecodePool:
    """`workers` processes that decode and preprocess pictures; started by `start`, or on first use."""

    def __init__(self, workers: int):
        self.workers = workers
        self.used: set[int] = set()  # the processes that prepared a picture
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _start(self, workers: int) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(workers, mp_context=context, initializer=_in_worker, initargs=(os.getpid(),))

    def start(self) -> DecodePool:
        """Start every process now, without waiting for them."""
        pool = self._current()
        for _ in range(self.workers):
            pool.submit(_ready)
        return self

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = self._start(self.workers)
            return self._pool

    def prepare(self, path: bytes, mtime_ns: int | None, side: int, preprocess: Callable[[Any], Any]) -> Prepared:
        """prepare_picture in a worker process; `preprocess` must pickle (a Preprocess does)."""
        pool = self._current()
        try:
            pid, prepared = pool.submit(_prepare, path, mtime_ns, side, preprocess).result()
        except BrokenProcessPool:
            self._replace(pool)
            pid, prepared = self._alone(path, mtime_ns, side, preprocess)
        self.used.add(pid)
        return prepared

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:  # the first thread to see it broken replaces it
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._start(self.workers)

    def _alone(self, path: bytes, mtime_ns: int | None, side: int, preprocess: Callable) -> tuple[int, Prepared]:
        with self._start(1) as pool:
            try:
                return pool.submit(_prepare, path, mtime_ns, side, preprocess).result()
            except BrokenProcessPool:
                raise BadFileError("the decoder crashed on it") from None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
