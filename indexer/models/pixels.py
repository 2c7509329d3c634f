"""A CLIP model's image preprocessing in PIL and numpy: open_clip's transform without torch.

    preprocess = Preprocess(size=(224, 224), mean=..., std=...)
    pixels = preprocess(image)    # (3, 224, 224) float32, as open_clip's transform gives

The steps are torchvision's, on the same PIL calls, so the numbers are the same: resize the
shorter side to the model's size and crop the centre (CLIP, MobileCLIP), or squash to a square
without cropping (SigLIP, SigLIP 2, NLLB-SigLIP, CLIPA, DFN, PE-Core); scale to [0, 1];
normalise per channel with the model's mean and std. tests/test_pixels.py holds it to open_clip's
transform for each family's settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

__all__ = ["INTERPOLATIONS", "RESIZE_MODES", "Preprocess", "embed_in_batches"]

INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
RESIZE_MODES = ("shortest", "squash")  # open_clip's "longest" pads instead of cropping: no pretrained tag uses it


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS or self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unsupported preprocessing: {self.interpolation}, {self.resize_mode}")
        if self.resize_mode == "shortest" and self.size[0] != self.size[1]:
            raise ValueError(f"cropping to a non-square size {self.size} is not ported")

    def __call__(self, image: Image.Image) -> np.ndarray:
        height, width = self.size
        if self.resize_mode == "squash":
            image = image.resize((width, height), INTERPOLATIONS[self.interpolation])
        else:
            image = self._crop(image.resize(self.shortest(image.size), INTERPOLATIONS[self.interpolation]))
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def shortest(self, size: tuple[int, int]) -> tuple[int, int]:
        # torchvision's Resize(int): the shorter side becomes the size, the longer keeps the ratio (rounded down)
        width, height = size
        side = self.size[0]
        if width <= height:
            return side, int(side * height / width)
        return int(side * width / height), side

    def _crop(self, image: Image.Image) -> Image.Image:
        # torchvision's CenterCrop: the offsets are rounded, half to even
        width, height = image.size
        top, left = round((height - self.size[0]) / 2), round((width - self.size[1]) / 2)
        return image.crop((left, top, left + self.size[1], top + self.size[0]))

    @classmethod
    def from_open_clip(cls, config: dict) -> Preprocess:
        """From an open_clip model's `visual.preprocess_cfg` (its tag's settings over open_clip's
        defaults, at the model's input size). ValueError names what is not ported."""
        if config.get("mode", "RGB") != "RGB":
            raise ValueError(f"unsupported preprocessing: pictures in {config['mode']} mode")
        size = config["size"]
        return cls(
            (size, size) if isinstance(size, int) else tuple(size),
            tuple(config["mean"]),
            tuple(config["std"]),
            config.get("interpolation") or "bicubic",  # open_clip reads an unset one as its default
            config.get("resize_mode") or "shortest",
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})


def embed_in_batches(
    images: Sequence[Image.Image],
    batch_size: int,
    preprocess: Callable[[Image.Image], object],
    embed_batch: Callable[[list], np.ndarray],
    dim: int,
) -> np.ndarray:
    """Pictures preprocessed and embedded `batch_size` at a time: (n, dim) float32 rows. Both
    runtimes' encoders embed PIL pictures this way, each with its own preprocess and model."""
    rows = [
        embed_batch([preprocess(image) for image in images[start : start + batch_size]])
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
