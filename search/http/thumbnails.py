"""Small JPEG previews of stored pictures, for the web page and clip-retrieval clients."""

from __future__ import annotations

import io
import os
from pathlib import Path

from indexer.errors import BadFileError, QueryError
from indexer.sources.pictures import decode_image
from search.recent import Recent

SIZES = (64, 1024)  # the smallest and largest preview side served
_CACHED = 512  # previews kept in memory: a few pages of results, about 10 MB at 256 px


class Thumbnails:
    """Makes previews on demand and keeps the recent ones; safe to share between threads."""

    def __init__(self, capacity: int = _CACHED):
        self._cache = Recent(capacity)

    def jpeg(self, path: Path, side: int = 256) -> bytes:
        """A JPEG at most `side` pixels on its long side; QueryError when the picture cannot be read."""
        if not SIZES[0] <= side <= SIZES[1]:
            raise QueryError(f"a preview is {SIZES[0]} to {SIZES[1]} pixels, not {side}")
        try:
            stat = path.stat()
        except OSError as error:
            raise QueryError(f"the picture is no longer on disk: {path}") from error
        # The file's size and time are in the key, so an edited picture gets a new preview.
        key = (os.fspath(path), stat.st_size, stat.st_mtime_ns, side)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        try:
            image = decode_image(os.fsencode(path), side).image
        except BadFileError as error:
            raise QueryError(f"cannot read {path}: {error}") from error
        image.thumbnail((side, side))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        data = out.getvalue()
        self._cache.put(key, data)
        return data
