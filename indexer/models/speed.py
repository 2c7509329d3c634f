"""How fast a model embeds on this machine, for `clipseek models --bench`.

Speed does not depend on the weights' values, so models are measured at random initialisation
(RANDOM_WEIGHTS): nothing is downloaded, and any architecture can be compared with the default
before fetching it. Models are measured with torch, in one process, one after the other, so their
ratio compares architectures; the ONNX path changes the absolute figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from indexer.models.identity import RANDOM_WEIGHTS

PICTURES = 16
TEXTS = 64
TEXT = "a photo of a small dog running on the beach at sunset"


@dataclass(frozen=True)
class Speed:
    model: str
    images_per_s: float
    texts_per_s: float


def measure(architecture: str, pictures: int = PICTURES, texts: int = TEXTS) -> Speed:
    """Images and texts embedded per second by `architecture`, at random initialisation."""
    from indexer.models.encoder import load_encoder  # torch: only where a model is measured

    encoder = load_encoder(architecture, RANDOM_WEIGHTS)
    noise = np.random.default_rng(0).integers(0, 256, (pictures, 320, 320, 3), dtype=np.uint8)
    images = [Image.fromarray(array) for array in noise]
    captions = [f"{TEXT} {number}" for number in range(texts)]
    encoder.embed_images(images[:2])  # the first call pays for allocations, not for the model
    encoder.embed_texts(captions[:2])
    return Speed(
        architecture,
        pictures / best_seconds(lambda: encoder.embed_images(images)),
        texts / best_seconds(lambda: encoder.embed_texts(captions)),
    )


def best_seconds(work, runs: int = 3) -> float:
    """The fastest of `runs`: a run slowed by something else on the machine says nothing of the model."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)
