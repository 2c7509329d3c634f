"""What the API reads before pydantic sees it, held to stricter rules than Python's own parsers.

Python's json module takes what JSON does not allow (NaN, Infinity, and 1e999 read as infinity),
lone surrogates ("\\ud800", which no UTF-8 text can carry and which fail later, deep inside the
model's tokenizer or SQLite), and nests as deep as the interpreter's stack goes. Starlette decodes
query strings leniently, turning bytes that are not UTF-8 into U+FFFD. Here each of these is a 400
that names the problem. Every API route reads its request through StrictRoute, which checks the
token first (a client without it gets a 401 before its body is read or parsed), then takes a
place among the server's workers and their queue (a 503 when there is none).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote_to_bytes

import numpy as np
from fastapi import HTTPException, Request
from fastapi.routing import APIRoute

from search.http.context import authorise

MAX_DEPTH = 32  # levels of nested arrays and objects; the deepest request (an inline policy) needs 6

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# \ud800 to \udfff, the only way a surrogate gets into JSON that is UTF-8; mostly in valid pairs
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_STEP = np.zeros(256, np.int8)  # what each byte outside strings does to the depth
_STEP[np.frombuffer(b"[{", np.uint8)] = 1
_STEP[np.frombuffer(b"]}", np.uint8)] = -1


def parse_json(body: bytes) -> Any:
    """A request body as JSON: HTTPException 400 for what JSON or UTF-8 forbid, JSONDecodeError (422) for bad syntax."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "the request body is not UTF-8 text") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise _too_deep() from None
    if _depth(body) > MAX_DEPTH:
        raise _too_deep()
    if _SURROGATE_ESCAPE.search(body) and not _encodable(value):
        raise HTTPException(400, "the request's JSON holds a lone surrogate (such as \\ud800), which is no text")
    return value


def check_query_string(raw: bytes) -> None:
    """400 unless the percent-decoded query string is UTF-8 (which has no surrogates)."""
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "the query string is not UTF-8 text once percent-decoded") from None


class StrictRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictRoute(APIRoute):
    """A route that checks the token, waits for a worker, checks its query string and reads JSON with parse_json."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict_handler(request: Request):
            authorise(request)
            async with request.app.state.workers.admission():
                check_query_string(request.scope["query_string"])
                return await handler(StrictRequest(request.scope, request.receive))

        return strict_handler


def _no_constant(name: str) -> float:
    raise HTTPException(400, f"the request's JSON holds {name}, which is not a JSON number")


def _finite(literal: str) -> float:
    number = float(literal)
    if not np.isfinite(number):
        raise HTTPException(400, f"the number {literal[:40]} in the request's JSON is too large for a double")
    return number


def _encodable(value: Any) -> bool:
    """Whether a parsed value is Unicode throughout: a lone surrogate, in a key or a value, cannot be encoded."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _depth(body: bytes) -> int:
    """How deep arrays and objects nest, counted on the brackets outside strings."""
    skeleton = np.frombuffer(_STRING.sub(b"", body), np.uint8)
    return int(np.cumsum(_STEP[skeleton], dtype=np.int64).max(initial=0))


def _too_deep() -> HTTPException:
    return HTTPException(400, f"the request's JSON nests deeper than {MAX_DEPTH} levels")
