"""Re-ranking a search's short list with a matcher (indexer.models.matcher): the dual encoder finds
the candidates, the matcher reads each candidate with the query and orders them by its logit of
a match, the dual encoder's evidence added.

A text query re-ranks pictures; a picture query (a file, bytes, a PIL image or a stored
picture's id) re-ranks captions. The matcher reads the stored pictures from their files: a
candidate whose file cannot be read now keeps its cosine and goes after those the matcher read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.errors import BadFileError, QueryError
from indexer.models.matcher_base import probability
from search.query import Query

if TYPE_CHECKING:
    from PIL import Image

    from indexer.models.matcher import Matcher
    from indexer.store import Store

__all__ = ["READ_SIDE", "query_side", "reading_side", "rerank"]

log = logging.getLogger("clipseek")

READ_SIDE = 256  # stored pictures are decoded to at least this side (or the matcher's) before its own resizing


def query_side(
    query: Any, modality: str, store: Store, read_query_image: Callable[[Any, int], Image.Image], side: int = READ_SIDE
):
    """What the matcher reads of the query: its text (re-ranking pictures) or its picture
    (captions), decoded to at least `side` (the matcher's: READ_SIDE or more)."""
    terms = Query.of(query).terms
    wanted = "text" if modality == "image" else "picture"
    if len(terms) != 1 or terms[0][0] != 1.0 or terms[0][1] == "vector":
        raise QueryError(f"re-ranking reads one {wanted} with each candidate: give one {wanted}, not a mix of terms")
    _, kind, value = terms[0]
    if kind == "item":
        row = store.catalog.items_by_id([value]).get(value)
        if row is None:
            raise QueryError(f"no item {value} in the index")
        kind = "text" if row.modality == "text" else "image"
        value = row.caption if kind == "text" else _stored_picture(row, side)
        if value is None:
            raise QueryError(f"the picture of item {row.id} cannot be read now")
    if (kind == "text") != (modality == "image"):
        raise QueryError(
            "re-ranking pairs pictures with captions: a text query re-ranks pictures, a picture query "
            f"re-ranks captions (--texts); this one asks for {'captions' if modality == 'text' else 'pictures'} "
            f"with a {'text' if kind == 'text' else 'picture'}"
        )
    return value if kind == "text" else read_query_image(value, side)


def rerank(
    matcher: Matcher, query: Any, rows: dict, found: list[tuple[int, float]], count: int, logit_scale: float
) -> list[tuple[int, float, float | None]]:
    """`found` (id, cosine), best first, with its first `count` re-ordered by the matcher:
    (id, cosine, probability), the re-scored ones first; those the matcher could not read, and
    those past `count`, keep their cosine order with no probability. The probability shown is the
    matcher's own; the order is by its logit with the dual encoder's evidence added
    (Matcher.rerank_logits; `logit_scale`: the dual encoder's), which alone would read as a
    probability near 0 for every candidate but the dual encoder's first."""
    head = [(i, s) for i, s in found[:count] if i in rows]
    if isinstance(query, str):
        side = reading_side(matcher)
        pictures = {i: _stored_picture(rows[i], side) for i, _ in head}
        readable = [(i, s) for i, s in head if pictures[i] is not None]
        logits = matcher.match_logits([pictures[i] for i, _ in readable], [query]) if readable else np.zeros(0)
    else:
        readable = head
        logits = matcher.match_logits([query], [rows[i].caption for i, _ in readable]) if readable else np.zeros(0)
    order = matcher.rerank_logits(logits, np.array([s for _, s in readable]), logit_scale) if len(logits) else logits
    ranked = sorted(zip(order, readable, probability(logits), strict=True), key=lambda row: -row[0])
    scored = [(i, s, float(p)) for _, (i, s), p in ranked]
    done = {i for i, _, _ in scored}
    return scored + [(i, s, None) for i, s in found if i not in done]


def reading_side(matcher: Matcher) -> int:
    """The side pictures are decoded to for `matcher`: at least its own, so that it never reads an
    enlarged thumbnail."""
    return max(READ_SIDE, matcher.image_side)


def _stored_picture(row, side: int = READ_SIDE) -> Image.Image | None:
    from indexer.sources.pictures import decode_image  # Pillow's decoders: loaded when a search re-ranks

    try:
        return decode_image(os.fsencode(row.path), side).image
    except BadFileError as error:
        log.warning("re-ranking: %s cannot be read (%s); it keeps its cosine order", row.display, error)
        return None
