"""Read what gets indexed: walk folders, stat and hash files, decode pictures. No torch here.

Paths are bytes throughout, as the operating system gives them, so a name that is not valid
UTF-8 is stored and returned unchanged. Decoding yields an RGB PIL image just above the model's
input size (JPEG draft mode lets libjpeg scale down while decoding); the pipeline applies the
model's own preprocessing to it.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from indexer.errors import BadFileError, PixelBudgetError
from indexer.models.identity import sha256_file
from indexer.sources import decoder_notes
from indexer.sources.bit_depth import declared_bits, scale_top

# Files that name pictures rather than hold one, by suffix, with the Ray Data reader for each:
# lists of URLs or paths, and WebDataset shards.
LIST_READERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json", ".tar": "webdataset"}
IMAGE_SUFFIXES = frozenset(b".jpg .jpeg .jpe .jfif .mpo .png .webp .gif .bmp .dib .tif .tiff .avif .heic .heif".split())
# Only these decoders are ever tried, whatever a file's name says: a PDF or FITS file renamed
# .jpg is refused instead of being handed to a decoder nobody meant to expose.
# (Multi-picture JPEGs from cameras open through the JPEG decoder, as format "MPO".)
FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "AVIF"]
try:  # HEIC/HEIF with the optional extra: pip install 'clipseek[heif]'
    import pillow_heif

    pillow_heif.register_heif_opener()
    FORMATS.append("HEIF")
except ImportError:
    pass

# Pillow refuses pictures from 179 MP (DecompressionBombError, raised from the header alone) and
# warns from 89 MP. Local pictures in between are legitimate (a 12,000 × 8,000 photo is 96 MP):
# draft mode keeps their decoding small, so the warning is noise, like Pillow's other notes.
decoder_notes.install()

_EXIF_IFD, _DATE_TIME_ORIGINAL, _DATE_TIME = 0x8769, 36867, 306
VANISHED = "vanished"  # the reason given for a file deleted while a run was looking at it


class FileEntry(NamedTuple):  # a tuple: a rescan makes one per file, so cheap to build matters
    """A file found by a walk: its path (bytes) and what stat said of it."""

    path: bytes
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class DecodedImage:
    """A decoded picture: RGB, upright, at least `side` pixels on its short side where it was larger."""

    image: Image.Image
    width: int  # of the original picture, upright
    height: int
    taken_at: str | None  # EXIF date taken, ISO 8601, when the picture has one


def walk(
    roots: Iterable[bytes],
    suffixes: frozenset[bytes] = IMAGE_SUFFIXES,
    on_error: Callable[[bytes, str], None] | None = None,
) -> Iterator[FileEntry]:
    """Every file under `roots` whose suffix is in `suffixes`, in a stable order.

    Symbolic links are followed, but each real folder is visited once, so a link loop ends.
    A folder that cannot be read is reported to `on_error(path, reason)` and skipped; a file
    that vanishes while the walk runs is skipped.
    """
    seen: set[tuple[int, int]] = set()
    for root in roots:
        root = os.path.abspath(root)
        try:
            info = os.stat(root)
        except OSError as error:
            if on_error:
                on_error(root, _reason(error))
            continue
        if stat.S_ISREG(info.st_mode):
            if _has_suffix(os.path.basename(root), suffixes):
                yield FileEntry(root, info.st_size, info.st_mtime_ns)
            continue
        stack = [root]
        seen.add((info.st_dev, info.st_ino))
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=_name)
            except OSError as error:
                if on_error:
                    on_error(folder, _reason(error))
                continue
            folders = []
            for entry in entries:
                is_picture = _has_suffix(entry.name, suffixes)
                # A picture's suffix is checked before any stat: most of a photo library's cost.
                if not is_picture and entry.is_file():
                    continue
                try:
                    info = entry.stat()  # follows links
                except OSError:  # vanished, or a dangling link
                    continue
                if stat.S_ISDIR(info.st_mode):
                    if (info.st_dev, info.st_ino) not in seen:
                        seen.add((info.st_dev, info.st_ino))
                        folders.append(entry.path)
                elif is_picture and stat.S_ISREG(info.st_mode):
                    yield FileEntry(entry.path, info.st_size, info.st_mtime_ns)
            stack.extend(reversed(folders))


def _has_suffix(name: bytes, suffixes: frozenset[bytes]) -> bool:
    dot = name.rfind(b".")
    return dot > 0 and name[dot:].lower() in suffixes


def _name(entry: os.DirEntry) -> bytes:
    return entry.name


def file_hash(path: bytes) -> str:
    """The sha256 of a file's content: how a moved or renamed file is recognised."""
    try:
        return sha256_file(path)
    except FileNotFoundError as error:
        raise BadFileError(VANISHED) from error
    except OSError as error:
        raise BadFileError(_reason(error)) from error


def decode_image(source: bytes | BinaryIO, side: int, max_pixels: int | None = None) -> DecodedImage:
    """Decode a picture (a path, or an open binary file) for a model whose input is `side` pixels square.

    With `max_pixels`, a picture whose header declares more pixels is refused with
    PixelBudgetError before any of it is decoded. Raises BadFileError with the reason when it
    is not a picture clipseek reads; the reason ends with what Pillow logged about it, if anything.
    """
    with decoder_notes.collected() as notes:
        try:
            return _decode(source, side, max_pixels)
        except Image.DecompressionBombError as error:
            if max_pixels is not None:
                raise PixelBudgetError(
                    f"more than {_megapixels(2 * Image.MAX_IMAGE_PIXELS)} is over the pixel budget of "
                    f"{_megapixels(max_pixels)}"
                ) from error
            raise _bad(f"decompression bomb refused: {error}", notes) from error
        except UnidentifiedImageError as error:
            if _is_empty(source):
                raise BadFileError("empty file") from error
            raise _bad("not a picture in a supported format (" + ", ".join(FORMATS) + ")", notes) from error
        except FileNotFoundError as error:
            raise BadFileError(VANISHED) from error
        except (BadFileError, PixelBudgetError):
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            # Pillow's ways of saying truncated or corrupt
            raise _bad(f"corrupt or truncated picture: {error}", notes) from error
        except Exception as error:
            # A decoder fed hostile bytes can fail in any way (KeyError, struct.error, ...); one bad
            # file must never stop a run.
            raise _bad(f"cannot decode: {type(error).__name__}: {error}", notes) from error


def _decode(source: bytes | BinaryIO, side: int, max_pixels: int | None) -> DecodedImage:
    with Image.open(source, formats=FORMATS) as image:  # reads the header only
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise PixelBudgetError(
                f"{width} × {height} pixels ({_megapixels(width * height)}) is over the pixel budget of "
                f"{_megapixels(max_pixels)}"
            )
        image.seek(0)  # the first frame of an animation, or of a camera's multi-picture JPEG (MPO)
        if image.format in ("JPEG", "MPO"):
            image.draft("RGB", (side, side))  # decode at 1/2..1/8 scale, still >= side
        bits = declared_bits(image)
        exif = image.getexif()
        upright = ImageOps.exif_transpose(image)  # also loads the pixels
        if exif.get(0x0112) in (5, 6, 7, 8):
            width, height = height, width
        return DecodedImage(to_rgb(upright, bits), width, height, _date_taken(exif))


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} MP"


def _bad(reason: str, notes: list[str]) -> BadFileError:
    return BadFileError(f"{reason} (Pillow: {'; '.join(notes)})" if notes else reason)


class Prepared(NamedTuple):
    """A picture ready for the model: its pixels after the model's preprocessing, and its metadata."""

    pixels: Any
    width: int
    height: int
    taken_at: str | None


def prepare_picture(
    source: bytes | BinaryIO, mtime_ns: int | None, side: int, preprocess: Callable[[Image.Image], Any]
) -> Prepared:
    """Decode a picture (a path, or an open binary file) and put it through `preprocess`; one
    without an EXIF date is dated by `mtime_ns`, its file's time, when there is one. Raises
    BadFileError as decode_image does."""
    decoded = decode_image(source, side)
    taken_at = decoded.taken_at or (datetime.fromtimestamp(mtime_ns / 1e9).isoformat() if mtime_ns else None)
    return Prepared(preprocess(decoded.image), decoded.width, decoded.height, taken_at)


class JpegHeader(NamedTuple):
    """A JPEG that a GPU may decode as the CPU path would (indexer.models.gpu_jpegs): its bytes,
    and what its header says."""

    data: bytes
    orientation: int  # EXIF orientation, 1–8
    width: int  # upright
    height: int
    taken_at: str | None


def jpeg_header(path: bytes, mtime_ns: int | None) -> JpegHeader | None:
    """The file's bytes and header when it is a plain JPEG in colour or grey (no CMYK, not a
    camera's multi-picture file); None for anything else, which the CPU path decodes (and records
    when it cannot). Only the header is parsed here."""
    try:
        with open(path, "rb") as stream:
            data = stream.read()
        with decoder_notes.collected(), Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            exif = image.getexif()
            orientation = exif.get(0x0112)
            orientation = orientation if orientation in range(1, 9) else 1
            width, height = image.size
            taken_at = _date_taken(exif)
    except Exception:  # unreadable or not a JPEG: the CPU path says why
        return None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    taken_at = taken_at or (datetime.fromtimestamp(mtime_ns / 1e9).isoformat() if mtime_ns else None)
    return JpegHeader(data, orientation, width, height, taken_at)


def _is_empty(source: bytes | BinaryIO) -> bool:
    if isinstance(source, bytes):
        return os.path.getsize(source) == 0
    return source.seek(0, os.SEEK_END) == 0


def to_rgb(image: Image.Image, bits: int | None = None) -> Image.Image:
    """RGB with transparency flattened onto white and high bit depths scaled, not clipped: by the
    `bits` the file declares (bit_depth.declared_bits) when its values fit them, else by their own range."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        values = np.clip(np.asarray(image, dtype=np.float64), 0, None)
        top = max(float(values.max()), 1e-12) if mode == "F" else scale_top(values, bits)
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, P without transparency, ...


def _date_taken(exif: Image.Exif) -> str | None:
    text = exif.get_ifd(_EXIF_IFD).get(_DATE_TIME_ORIGINAL) or exif.get(_DATE_TIME)
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text.strip("\x00 "), "%Y:%m:%d %H:%M:%S").isoformat()
    except ValueError:
        return None


def _reason(error: OSError) -> str:
    return error.strerror or str(error)
