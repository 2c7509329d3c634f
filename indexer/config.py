"""Where indexes and caches live, and the settings of an indexing run.

Indexes live in the data directory: `$CLIPSEEK_HOME`, else `$XDG_DATA_HOME/clipseek`, else
`~/.local/share/clipseek`; each named index is a folder under `indexes/` there. A path (anything
with a slash, or an existing folder) names an index folder directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_INDEX = "default"


def data_home() -> Path:
    if os.environ.get("CLIPSEEK_HOME"):
        return Path(os.environ["CLIPSEEK_HOME"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(xdg) / "clipseek"


def cache_home() -> Path:
    """Where files derived from models live, shared by every index (their ONNX exports):
    `$CLIPSEEK_CACHE`, else `$XDG_CACHE_HOME/clipseek`, else `~/.cache/clipseek`."""
    if os.environ.get("CLIPSEEK_CACHE"):
        return Path(os.environ["CLIPSEEK_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipseek"


def index_dir(index: str | os.PathLike | None = None) -> Path:
    """The folder of an index given by name (in the data directory) or by path; None: the default."""
    if index is None:
        return data_home() / "indexes" / DEFAULT_INDEX
    text = os.fspath(index)
    if os.sep in text or text.startswith(".") or Path(text).is_dir():
        return Path(text).expanduser()
    return data_home() / "indexes" / text


@dataclass(frozen=True)
class IndexSettings:
    """How an indexing run works; the defaults suit a laptop."""

    batch_size: int = 32  # images per model call and per committed transaction
    workers: int = max(1, min(4, os.cpu_count() or 1))  # decoding threads, overlapping the model
