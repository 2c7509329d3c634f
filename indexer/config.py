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
# The pixel budget of pictures that come from others (uploads and fetched URLs to `clipseek
# serve`, `clipseek moderate`), checked from their header: a large phone photo is 50 MP, while a
# 20 KB PNG can declare 144 MP (half a gigabyte decoded, seconds of work). The indexer's own folders
# have none: their big photos are legitimate and decode small (pictures.decode_image).
PIXEL_BUDGET = 50_000_000
# Candidates a matcher re-scores when a search asks for re-ranking without saying how many
# (search.matching): enough to hold the answer the dual encoder missed, few enough to stay quick.
DEFAULT_RERANK = 30


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
    workers: int | None = None  # decoding threads, overlapping the model; None: decoding_threads decides

    def decoding_threads(self, gpu: bool) -> int:
        """`workers`, else every core where a GPU embeds, and up to 4 where the CPU embeds too
        (the model's own threads need the other cores)."""
        cores = os.cpu_count() or 1
        return self.workers or (cores if gpu else max(1, min(4, cores)))


@dataclass(frozen=True)
class RaySettings:
    """How `clipseek index --ray` runs: where Ray is, and how many model actors embed."""

    address: str | None = None  # None: start a local Ray on this machine for the run
    workers: int = 1  # model actors (one model load each)
    batch_size: int = 32  # pictures per decoding task call and per model call
    fetch_timeout: float = 20.0  # seconds for a whole download of a listed URL
    fetch_max_bytes: int = 64 << 20  # larger pictures are recorded as failures, not read


@dataclass(frozen=True)
class ListSource:
    """Lists of pictures, or WebDataset shards, and which of their columns say what."""

    paths: tuple[str, ...]
    url_column: str | None = None  # default: url, URL, image_url, path or image_path, the first it has
    caption_column: str | None = None  # default: caption, TEXT or text, the first it has; captions are optional
    collection: str | None = None  # the captions' collection; default: the first list's name
