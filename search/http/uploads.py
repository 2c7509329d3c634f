"""Request bodies as they arrive: a limit on their size, and a note when a client leaves mid-way."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

log = logging.getLogger("clipseek.http")


class BodyGuard:
    """Refuses a request body larger than `limit` bytes with 413, whether it says its length or not,
    and logs one line, not a traceback, for a client that goes away before its body is all sent.

    A streamed body is counted as the application reads it; past the limit the client gets the
    413 at once, the application sees a disconnected client, and whatever it answers is dropped.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        received = 0
        refused = gone = complete = False

        async def counted_receive():
            nonlocal received, refused, gone, complete
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = not complete
                return message
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if received > self.limit:
                refused = True
                await self._refuse(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except ClientDisconnect:
            if not (gone or refused):  # the body stopped short for a reason this class does not know
                raise
        if gone:
            host, port = scope.get("client") or ("?", 0)
            log.warning(
                "client %s:%s went away during %s %s after sending %d bytes of its body",
                host,
                port,
                scope["method"],
                scope["path"],
                received,
            )

    async def _refuse(self, scope, receive, send):
        detail = f"the request body is larger than {self.limit} bytes"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
