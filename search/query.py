"""What a search asks and what it answers: Query, a weighted sum of texts, pictures, stored items
and vectors, and Hit, one result. SearchEngine (search.engine) embeds and answers them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.errors import QueryError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["Hit", "Query"]


@dataclass(frozen=True)
class Hit:
    """One result: the item, its cosine similarity to the query, and what is known of it."""

    id: int
    score: float
    modality: str
    path: str | None = None  # images
    caption: str | None = None  # texts
    collection: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    match: float | None = None  # a matcher's probability that the query and the item match, when re-ranked

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Query:
    """A weighted sum of terms — texts, images, stored items — each embedded and normalised.

    Terms combine with + and -, and scale with a number: `Query.text("beach") + "dog" -
    0.5 * Query.text("people")`. A plain string is a text, a Path, PIL image or bytes an
    image, an int a stored item.
    """

    def __init__(self, terms: Iterable[tuple[float, str, Any]] = ()):
        self.terms = list(terms)  # (weight, kind, value), kind: "text" | "image" | "item" | "vector"

    @classmethod
    def text(cls, text: str) -> Query:
        return cls([(1.0, "text", text)])

    @classmethod
    def image(cls, image: str | os.PathLike | bytes | Image.Image) -> Query:
        return cls([(1.0, "image", Path(image) if isinstance(image, str) else image)])

    @classmethod
    def item(cls, item_id: int) -> Query:
        return cls([(1.0, "item", int(item_id))])

    @classmethod
    def vector(cls, vector: Sequence[float]) -> Query:
        """An embedding made elsewhere with the same model (it is normalised here)."""
        vector = np.asarray(vector, dtype=np.float64)
        if not np.isfinite(vector).all():
            raise QueryError("a query vector must hold finite numbers (no NaN or infinity)")
        largest = np.abs(vector).max(initial=0)
        if largest > 0:  # scaled first, so that the norm of values near 1e308 does not overflow
            vector = vector / largest
        return cls([(1.0, "vector", vector / max(np.linalg.norm(vector), 1e-12))])

    @classmethod
    def of(cls, value: Any) -> Query:
        """A query from a plain value: str → text, int → item, anything else → image."""
        if isinstance(value, Query):
            return value
        if isinstance(value, str):
            return cls.text(value)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return cls.item(int(value))
        return cls.image(value)

    def __add__(self, other: Any) -> Query:
        return Query(self.terms + Query.of(other).terms)

    __radd__ = __add__

    def __sub__(self, other: Any) -> Query:
        return self + (-1.0) * Query.of(other)

    def __mul__(self, weight: float) -> Query:
        return Query((weight * w, kind, value) for w, kind, value in self.terms)

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return " + ".join(f"{w:g}·{kind}({_describe(kind, value)})" for w, kind, value in self.terms) or "Query()"


def _describe(kind: str, value: Any) -> str:
    if kind == "vector":
        return f"{len(value)} values"
    if kind == "image" and isinstance(value, (str, os.PathLike)):
        return repr(os.fspath(value))
    return repr(value) if kind != "image" else type(value).__name__
