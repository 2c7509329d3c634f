"""What every matcher is, whatever runs it: a model that reads a picture and a caption together and
gives its logit that the caption is true of the picture. search.matching re-ranks with any of them
through this interface alone; indexer.models.matcher names and loads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["Matcher", "pairing", "probability"]


class Matcher:
    """A loaded matcher. Subclasses set `name`, `sha256` (of the weights file: its identity),
    `image_side` (the side it reads pictures at), `dual_weight`, and give `match_logits`."""

    name: str
    sha256: str
    image_side: int
    # How much of the dual encoder's evidence (its logit scale × cosine) is added to the matcher's
    # logit when a short list is re-ranked, as ALBEF and BLIP rank theirs.
    dual_weight: float

    def describe(self) -> str:  # what it is, after its name and identity
        raise NotImplementedError

    def __str__(self) -> str:
        return f"{self.name} (sha256:{self.sha256[:12]}, {self.describe()})"

    def match_logits(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        """The logit of a match for each pair (images[i], texts[i]); a list of one is paired with
        every item of the other (one query text against candidate pictures, or one picture against
        captions)."""
        raise NotImplementedError

    def match(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        """`match_logits` as probabilities."""
        return probability(self.match_logits(images, texts))

    def rerank_logits(self, logits: np.ndarray, cosines: np.ndarray, logit_scale: float) -> np.ndarray:
        """The logits a short list is ordered by: the matcher's, plus `dual_weight` of the dual
        encoder's evidence measured from the best candidate's cosine (so the dual encoder's first
        keeps the matcher's own logit, and the others lose what the dual encoder holds against them)."""
        return logits + self.dual_weight * logit_scale * (cosines - cosines.max())


def pairing(images: list, texts: list) -> tuple[int, np.ndarray, bool]:
    """How `match_logits` pairs its arguments: (pairs, the picture of each pair, whether the texts
    are one to repeat); ValueError when the two lists cannot be paired."""
    count = max(len(images), len(texts))
    if min(len(images), len(texts)) == 0 or {len(images), len(texts)} - {1, count}:
        raise ValueError(f"cannot pair {len(images)} pictures with {len(texts)} texts")
    rows = np.arange(count) if len(images) == count else np.zeros(count, np.int64)
    return count, rows, len(texts) != count


def probability(logits: np.ndarray) -> np.ndarray:
    """A matcher's logits of a match as probabilities (the logistic function)."""
    return 1 / (1 + np.exp(-logits))
