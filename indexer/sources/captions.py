"""Read caption collections: CSV, TSV, JSONL or plain text (one caption per line).

CSV and TSV files have a header row naming a caption column (caption, text, sentence or
description) and optionally an id column (id, caption_id) and an image column (image,
image_path, path, file, filename). JSONL rows are objects with the same keys. A UTF-8 byte-order
mark is fine. A row that cannot be read is reported with its line number, never fatal.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from indexer.errors import BadFileError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "text"}
CAPTION_KEYS = ("caption", "text", "sentence", "description")
ID_KEYS = ("id", "caption_id")
IMAGE_KEYS = ("image", "image_path", "path", "file", "filename")


@dataclass(frozen=True)
class CaptionRow:
    line: int
    caption: str
    ref: str | None = None  # the row's id
    image: str | None = None  # the row's image path


@dataclass
class CaptionFile:
    rows: list[CaptionRow] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)


def read_captions(path: str | Path, file_format: str | None = None) -> CaptionFile:
    """Every readable row of a caption file, and the line and reason of every other row."""
    path = Path(path)
    file_format = file_format or FORMATS.get(path.suffix.lower())
    if file_format not in FORMATS.values():
        known = ", ".join(sorted(set(FORMATS.values())))
        raise BadFileError(f"cannot tell the format of {path.name}: name it with --format ({known})")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadFileError(f"cannot read {path}: {error.strerror or error}") from error
    # surrogateescape keeps going past bytes that are not UTF-8; such rows are reported below.
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    result = CaptionFile()
    rows = {"csv": _table, "tsv": _table, "jsonl": _jsonl, "text": _lines}[file_format]
    for line, fields in rows(text, "\t" if file_format == "tsv" else ","):
        if isinstance(fields, str):
            result.problems.append((line, fields))
            continue
        values = [value for value in fields.values() if isinstance(value, str)]
        if any(_not_utf8(value) for value in values):
            result.problems.append((line, "not valid UTF-8"))
            continue
        caption = _first(fields, CAPTION_KEYS)
        if caption is None or not caption.strip():
            result.problems.append((line, "no caption"))
            continue
        result.rows.append(CaptionRow(line, caption.strip(), _first(fields, ID_KEYS), _first(fields, IMAGE_KEYS)))
    return result


def _first(fields: dict, keys: tuple[str, ...]) -> str | None:
    value = next((fields[key] for key in keys if fields.get(key) not in (None, "")), None)
    return None if value is None else str(value)


def _not_utf8(value: str) -> bool:
    return any("\udc80" <= character <= "\udcff" for character in value)


def _table(text: str, delimiter: str) -> Iterator[tuple[int, dict | str]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [name.strip().lower() for name in next(reader)]
    except StopIteration:
        return
    if not set(header) & set(CAPTION_KEYS):
        raise BadFileError(
            f"no caption column in the header ({', '.join(header)}); name one {' or '.join(CAPTION_KEYS)}"
        )
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield reader.line_num, f"unreadable row: {error}"
            continue
        if not row:
            continue  # a blank line
        if len(row) != len(header):
            yield reader.line_num, f"{len(row)} fields, the header has {len(header)}"
            continue
        yield reader.line_num, dict(zip(header, row, strict=True))


def _jsonl(text: str, _delimiter: str) -> Iterator[tuple[int, dict | str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            yield number, f"not JSON: {error}"
            continue
        yield number, row if isinstance(row, dict) else "not a JSON object"


def _lines(text: str, _delimiter: str) -> Iterator[tuple[int, dict | str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, {"caption": line}
