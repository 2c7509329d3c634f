"""What every HTTP route shares: the server's settings, its one engine, and how blocking work runs."""

from __future__ import annotations

import asyncio
import functools
import hmac
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request

from search.engine import SearchEngine

WORKERS = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's own default
QUEUE = 64  # requests waiting for a worker: at the pace of a picture search, a few seconds of work
# `clipseek serve --help` states both defaults in words, without importing this module.


@dataclass(frozen=True)
class ServerSettings:
    token: str | None = None
    max_body: int = 20 * 2**20  # bytes; a phone photo is 2-8 MB, base64 adds a third
    timeout: float = 30.0  # seconds a request may work before it is answered 504
    policy: Any = None  # search.moderation.Policy used by /moderate when a request brings none
    fetch_urls: bool = False  # /knn-service's image_url: the server fetches only when enabled
    cors: tuple[str, ...] = ()  # origins allowed to call the API from a browser (clip-front elsewhere)
    index_name: str = "default"  # the name /indices-list gives the index
    public_url: str = ""  # where clients reach the server (--public-url); empty: answers hold relative URLs
    workers: int = WORKERS  # engine calls that run at once (--workers)
    queue: int = QUEUE  # requests that wait for a worker beyond those (--queue); more are answered 503


class Workers:
    """The threads that run engine work, and the bounded queue of requests waiting for them.

    At most `count` engine calls run at once, each on a thread of this pool, and at most
    `count + queue` API requests are in the server at once; one more is answered 503 at once,
    with a Retry-After of how long those ahead of it take at the recent pace. A call that outlasts
    the timeout while it waits is dropped and never runs; one that outlasts it while running keeps
    its thread until the engine returns (Python cannot stop a thread), and its answer is thrown
    away. That thread is one of `count`, so timed-out work never adds to what runs at once.
    """

    def __init__(self, count: int, queue: int):
        self.count, self.queue = count, queue
        self.executor = ThreadPoolExecutor(count, thread_name_prefix="clipseek-worker")
        self.admitted = 0  # requests in the server now, running or waiting (read on the event loop only)
        self.pace = 0.1  # seconds a request takes, a moving average

    @asynccontextmanager
    async def admission(self):
        """A place for one request, or HTTPException 503 with Retry-After when every place is taken."""
        if self.admitted >= self.count + self.queue:
            wait = max(1, math.ceil(self.pace * self.admitted / self.count))
            raise HTTPException(
                503,
                f"every worker is busy and {self.queue} requests wait: try again in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        self.admitted += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self.admitted -= 1
            self.pace += 0.2 * (time.monotonic() - started - self.pace)

    async def call(self, timeout: float, function, *args, **kwargs):
        """function(*args, **kwargs) on a worker; TimeoutError after `timeout` seconds, waiting included."""
        loop = asyncio.get_running_loop()
        # Cancelling the asyncio future cancels the pool's: a call that has not started never will.
        return await asyncio.wait_for(
            loop.run_in_executor(self.executor, functools.partial(function, *args, **kwargs)), timeout
        )


async def run(request: Request, function, *args, **kwargs):
    """Run blocking engine work on a worker, answering 504 if it outlasts the timeout."""
    timeout = request.app.state.settings.timeout
    try:
        return await request.app.state.workers.call(timeout, function, *args, **kwargs)
    except TimeoutError:
        raise HTTPException(504, f"the request took longer than {timeout:g} s") from None


def authorise(request: Request) -> None:
    """401 unless the server has no token or the request carries it as `Authorization: Bearer TOKEN`."""
    token = request.app.state.settings.token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest takes as long whatever the first differing byte, so timing tells nothing.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(
            401, "a valid 'Authorization: Bearer TOKEN' header is needed", headers={"WWW-Authenticate": "Bearer"}
        )


def engine_of(request: Request) -> SearchEngine:
    return request.app.state.engine


def link(request: Request, route: str, **params: str) -> str:
    """A URL of one of this server's routes for a client: relative, or under --public-url.

    Never built from the request's Host header, which any client can forge to plant its own
    address in answers that others may see (a shared cache, a page built from the answer).
    """
    return request.app.state.settings.public_url + request.app.url_path_for(route, **params)
