"""Pictures that real folders and uploads hold and decoders find odd, made byte by byte where Pillow
will not write them: a tiny PNG that declares a huge size, deep greys with their significant
bits declared, a camera's multi-picture JPEG, files that make Pillow warn or log."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, PngImagePlugin


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int = 12_000, height: int = 12_000) -> bytes:
    """A valid 1-bit PNG of `width` × `height` black pixels: some 20 KB on disk, 144 MP decoded."""
    rows = (b"\0" * (1 + (width + 7) // 8)) * height  # each row: filter type 0, then the bits
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows, 9))
        + _png_chunk(b"IEND", b"")
    )


def deep_png(values: np.ndarray, significant_bits: int | None = None) -> bytes:
    """A 16-bit grey PNG of `values`, with an sBIT chunk when `significant_bits` is given."""
    info = PngImagePlugin.PngInfo()
    if significant_bits is not None:
        info.add(b"sBIT", bytes([significant_bits]))
    out = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(out, "PNG", pnginfo=info)
    return out.getvalue()


def packed_12bit_tiff(values: np.ndarray) -> bytes:
    """A TIFF of 12-bit grey samples packed two in three bytes (BitsPerSample 12), as scanners write."""
    height, width = values.shape
    assert width % 2 == 0
    a, b = values.reshape(-1, 2).astype(np.uint16).T
    packed = np.stack([a >> 4, ((a & 0xF) << 4) | (b >> 8), b & 0xFF], axis=1).astype(np.uint8).tobytes()
    tags = [
        (256, 4, width),  # ImageWidth
        (257, 4, height),  # ImageLength
        (258, 3, 12),  # BitsPerSample
        (259, 3, 1),  # no compression
        (262, 3, 1),  # BlackIsZero
        (273, 4, 0),  # StripOffsets: filled in below
        (277, 3, 1),  # SamplesPerPixel
        (278, 4, height),  # RowsPerStrip
        (279, 4, len(packed)),  # StripByteCounts
    ]
    ifd_size = 2 + 12 * len(tags) + 4
    pixels_at = 8 + ifd_size
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        value = pixels_at if tag == 273 else value
        field = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)  # SHORTs sit left-aligned
        ifd += struct.pack("<HHI", tag, kind, 1) + field
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + packed


def mpo(first: Image.Image, second: Image.Image) -> bytes:
    """A camera's multi-picture JPEG (MPO) of two frames."""
    out = io.BytesIO()
    first.save(out, "MPO", save_all=True, append_images=[second], quality=95)
    return out.getvalue()


def jpeg_with_corrupt_exif(image: Image.Image) -> bytes:
    """A JPEG whose EXIF names a description lying past the end of the EXIF block: Pillow warns."""
    entry = struct.pack("<HHII", 0x010E, 2, 400, 1000)  # ImageDescription, 400 bytes at offset 1000
    tiff = b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + struct.pack("<I", 0)
    out = io.BytesIO()
    image.save(out, "JPEG", exif=b"Exif\0\0" + tiff)
    return out.getvalue()


def tiff_with_samples(samples_per_pixel: int) -> bytes:
    """An RGB TIFF whose SamplesPerPixel is rewritten: past 6, Pillow logs an error and refuses it."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 200, 0)).save(out, "TIFF")
    data = bytearray(out.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for entry in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack("<H", data[at : at + 2])[0] == 277:
            data[at + 8 : at + 10] = struct.pack("<H", samples_per_pixel)
    return bytes(data)
