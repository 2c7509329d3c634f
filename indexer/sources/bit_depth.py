"""How many bits of a deep picture (16-bit, 32-bit integer) carry its values.

Scanners and cameras write 10-, 12- or 14-bit values in 16-bit containers, often in the low
bits. Scaled as if they filled all 16, a valid 12-bit scan comes out nearly black, and every
such picture embeds like every other. A file may say how many bits are significant: PNG's sBIT
chunk (Pillow reads past it) or TIFF's BitsPerSample (12 for packed 12-bit data). Where it says
nothing, or where the values exceed what it says (PNG's specification has them shifted into the
high bits), the values' own maximum decides.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from PIL import Image

_BITS_PER_SAMPLE = 258
_PNG_SIGNATURE = 8  # bytes before the first chunk
_BEFORE_PIXELS = (b"PLTE", b"IDAT", b"fdAT", b"IEND")  # sBIT comes before all of these


def declared_bits(image: Image.Image) -> int | None:
    """The significant bits per sample the file declares, for deep pictures; read before loading."""
    if not image.mode.startswith("I"):
        return None
    if image.format == "TIFF":
        bits = image.tag_v2.get(_BITS_PER_SAMPLE)
        return max(bits) if isinstance(bits, tuple) and bits else bits if isinstance(bits, int) else None
    if image.format == "PNG":
        return _png_sbit(image)
    return None


def _png_sbit(image: Image.Image) -> int | None:
    fp = image.fp
    where = fp.tell()
    try:
        fp.seek(_PNG_SIGNATURE)
        while True:
            head = fp.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"sBIT":
                data = fp.read(min(length, 4))
                return data[0] if data else None  # grey (and alpha): the grey sample's bits
            if kind in _BEFORE_PIXELS:
                return None
            fp.seek(length + 4, os.SEEK_CUR)  # the chunk and its CRC
    finally:
        fp.seek(where)


def scale_top(values: np.ndarray, declared: int | None) -> float:
    """The value shown as white: the declared range when the values fit it, else their own."""
    top = float(values.max()) if values.size else 0.0
    if declared is not None and 1 <= declared <= 32 and top <= 2**declared - 1:
        return float(2**declared - 1)
    return float(2 ** max(8, int(top).bit_length()) - 1)
