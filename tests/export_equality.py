"""What an ONNX export must give: torch's vectors for texts and pictures, and so its scores."""

import numpy as np
from PIL import Image


def pictures(count: int) -> list[Image.Image]:
    """Noise pictures of `count` sizes, none of them square."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48, 40 + n, 3), dtype=np.uint8)) for n in range(count)]


def assert_embeds_like_torch(onnx, encoder, texts: list[str]) -> None:
    """Texts and pictures at cosine ≥ 0.9999 to torch's, scores within 1e-5, each text's best picture the same."""
    vectors, theirs = onnx.embed_texts(texts), encoder.embed_texts(texts)
    assert (vectors * theirs).sum(axis=1).min() >= 0.9999
    shown = pictures(6)
    images, their_images = onnx.embed_images(shown), encoder.embed_images(shown)
    assert (images * their_images).sum(axis=1).min() >= 0.9999
    scores, their_scores = vectors @ images.T, theirs @ their_images.T
    np.testing.assert_allclose(scores, their_scores, rtol=0, atol=1e-5)
    assert scores.argmax(axis=1).tolist() == their_scores.argmax(axis=1).tolist(), "each text finds the same picture"
