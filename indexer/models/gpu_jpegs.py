"""JPEGs decoded and preprocessed on an NVIDIA GPU (nvJPEG, through torchvision), for when the
CPU's cores cannot decode as fast as the GPU embeds.

    jpegs = GpuJpegs(preprocess, "cuda:0")
    pixels = jpegs.prepare([header, ...])    # one (3, H, W) float32 tensor on the GPU per header, or None

Which pictures come here is decided from their header on the CPU (pictures.jpeg_header): plain
JPEGs in colour or grey, whose pixels the CPU path would take as they are; CMYK, multi-picture
files and everything else take the CPU path. EXIF orientation turns the picture as Pillow's
ImageOps.exif_transpose does. The CPU path decodes at a reduced scale (JPEG draft mode) and
resizes with Pillow; here the whole picture decodes and is resized with torch's antialiased
filter of the same kind, so the numbers differ slightly (tests/test_gpu_jpegs.py holds the two
together). A picture nvJPEG refuses gives None, and the indexer decodes it on the CPU instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from indexer.models.pixels import Preprocess
from indexer.sources.pictures import JpegHeader

__all__ = ["GpuJpegs", "upright"]


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) picture turned as EXIF `orientation` (1–8) says, as ImageOps.exif_transpose turns it."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.flip(-1, -2).transpose(-1, -2)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


class GpuJpegs:
    """Decodes JPEGs on `device` and applies `preprocess` there, a batch at a time."""

    def __init__(self, preprocess: Preprocess, device: str):
        self.preprocess = preprocess
        self.device = device
        self._mean = torch.tensor(preprocess.mean, device=device).view(3, 1, 1)
        self._std = torch.tensor(preprocess.std, device=device).view(3, 1, 1)

    def prepare(self, headers: Sequence[JpegHeader]) -> list[torch.Tensor | np.ndarray | None]:
        """Each picture's model input (a tensor on the GPU; an array on the CPU, as the CPU path
        gives), or None where it could not be decoded here."""
        data = [torch.frombuffer(bytearray(header.data), dtype=torch.uint8) for header in headers]
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one picture nvJPEG refuses fails the batch: try each alone
            images = [self._one(tensor) for tensor in data]
        prepared = [
            None if image is None else self._pixels(upright(image, header.orientation))
            for image, header in zip(images, headers, strict=True)
        ]
        if self.device == "cpu":
            return [None if pixels is None else pixels.numpy() for pixels in prepared]
        return prepared

    def _one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def _pixels(self, image: torch.Tensor) -> torch.Tensor:
        """Preprocess's steps (indexer.models.pixels) on a (3, H, W) uint8 tensor."""
        height, width = self.preprocess.size
        mode = self.preprocess.interpolation
        if self.preprocess.resize_mode == "shortest":
            size = self.preprocess.shortest((image.shape[-1], image.shape[-2]))
            image = _resize(image, (size[1], size[0]), mode)
            top = round((image.shape[-2] - height) / 2)
            left = round((image.shape[-1] - width) / 2)
            image = image[:, top : top + height, left : left + width]
        else:
            image = _resize(image, (height, width), mode)
        return (image.float() / 255 - self._mean) / self._std


def _resize(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resized as Pillow resizes (antialiased), rounded to 8 bits as Pillow's result is."""
    if tuple(image.shape[-2:]) == size:
        return image
    resized = torch.nn.functional.interpolate(
        image[None].float(), size=size, mode=mode, antialias=True, align_corners=False
    )[0]
    return resized.round().clamp(0, 255)
