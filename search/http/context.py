"""What every HTTP route shares: the server's settings, its one engine, and how blocking work runs."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from search.engine import SearchEngine


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


async def run(request: Request, function, *args, **kwargs):
    """Run blocking engine work in the thread pool, answering 504 if it outlasts the timeout."""
    timeout = request.app.state.settings.timeout
    try:
        return await asyncio.wait_for(run_in_threadpool(function, *args, **kwargs), timeout)
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
