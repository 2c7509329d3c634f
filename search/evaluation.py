"""Recall@K of a model on an image–caption set, both directions, as retrieval papers report it.

Sets come as Karpathy-style JSON (Flickr30k, COCO: {"images": [{"filename", "filepath"?,
"split"?, "sentences": [{"raw"}]}]}) or as JSONL pairs ({"image", "caption"} per line, as the
demo library's captions.jsonl). A picture may have several captions; text→image counts a hit
when a caption's own picture is in the top K, image→text when any of the picture's captions is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.errors import BadFileError
from indexer.sources.pictures import decode_image

KS = (1, 5, 10)


@dataclass
class EvalSet:
    images: list[Path] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)  # captions[i] describes images[owner[i]]


def read_eval_set(path: str | os.PathLike, images: str | os.PathLike, split: str | None = None) -> EvalSet:
    """Pairs from a Karpathy-style JSON file or a JSONL file; image paths relative to `images`."""
    path, root = Path(path), Path(images)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise BadFileError(f"cannot read {path}: {error}") from error
    result = EvalSet()
    index: dict[Path, int] = {}

    def add(image: Path, caption: str) -> None:
        if image not in index:
            index[image] = len(result.images)
            result.images.append(image)
        result.captions.append(caption)
        result.owner.append(index[image])

    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            for line in text.splitlines():
                if line.strip():
                    row = json.loads(line)
                    add(root / row["image"], row["caption"])
        else:
            for entry in json.loads(text)["images"]:
                if split is None or entry.get("split") == split:
                    for sentence in entry["sentences"]:
                        add(root / entry.get("filepath", "") / entry["filename"], sentence["raw"])
    except (ValueError, KeyError, TypeError) as error:
        raise BadFileError(f"{path} is neither Karpathy-style JSON nor JSONL pairs: {error!r}") from error
    if not result.captions:
        raise BadFileError(f"no image–caption pairs in {path}" + (f" for split '{split}'" if split else ""))
    return result


def recall(
    pairs: EvalSet,
    embed_images: Callable[[list], np.ndarray],
    embed_texts: Callable[[list[str]], np.ndarray],
    side: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """{"text→image R@1": …, "image→text R@1": …, …} for K in 1, 5, 10."""
    image_vectors = []
    for start in range(0, len(pairs.images), batch_size):
        decoded = []
        for image in pairs.images[start : start + batch_size]:
            try:
                decoded.append(decode_image(os.fsencode(image), side).image)
            except BadFileError as error:
                raise BadFileError(f"{image}: {error}") from error
        image_vectors.append(embed_images(decoded))
    images = np.concatenate(image_vectors)
    texts = embed_texts(pairs.captions)
    similarity = texts @ images.T  # [captions, images]
    owner = np.asarray(pairs.owner)
    # Rank of each caption's own picture among all pictures (0 = first).
    own = similarity[np.arange(len(owner)), owner]
    text_rank = (similarity > own[:, None]).sum(axis=1)
    # Rank of each picture's best-scoring own caption among all captions.
    best_own = np.full(len(pairs.images), -np.inf)
    np.maximum.at(best_own, owner, own)
    image_rank = (best_own[:, None] < similarity.T).sum(axis=1)
    figures = {}
    for k in KS:
        figures[f"text→image R@{k}"] = float(np.mean(text_rank < k))
    for k in KS:
        figures[f"image→text R@{k}"] = float(np.mean(image_rank < k))
    return figures
