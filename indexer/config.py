"""Where indexes and caches live, and the settings of an indexing run.

Indexes live in the data directory: `$CLIPSEEK_HOME`, else `$XDG_DATA_HOME/clipseek`, else
`~/.local/share/clipseek`; each named index is a folder under `indexes/` there. A path (anything
with a slash, or an existing folder) names an index folder directly.

A PostgreSQL URL (`postgresql://user@host/db`) names an index whose catalog is in that database;
its vector files are derived data local to each machine, in a folder under `indexes/` named from
the URL without its password. That folder holds the URL (without its password) in `catalog.url`,
so its name is a named index too; any named index whose folder has a `catalog.url` keeps its
catalog there.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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


CATALOG_URL = "catalog.url"  # in an index folder: the URL of the database holding its catalog
URL_SCHEMES = ("postgresql://", "postgresql+psycopg://", "postgres://")


def is_catalog_url(index: str | os.PathLike | None) -> bool:
    return isinstance(index, str) and index.startswith(URL_SCHEMES)


def without_password(url: str) -> str:
    """The URL with its password left out (of the user part and of the query): safe to print or store."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}@{host}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def index_dir(index: str | os.PathLike | None = None) -> Path:
    """The folder of an index given by name (in the data directory) or by path; None: the default.
    For a PostgreSQL URL: the local folder of its vector files, named from the URL without its password."""
    if index is None:
        return data_home() / "indexes" / DEFAULT_INDEX
    if is_catalog_url(index):
        name = re.sub(r"[^A-Za-z0-9@._+-]+", "-", without_password(index).split("://", 1)[1]).strip("-")
        return data_home() / "indexes" / f"postgresql-{name}"
    text = os.fspath(index)
    if os.sep in text or text.startswith(".") or Path(text).is_dir():
        return Path(text).expanduser()
    return data_home() / "indexes" / text


def index_location(index: str | os.PathLike | None = None) -> str | Path:
    """What Store.open takes: the URL itself for a PostgreSQL catalog given as one (its password
    kept for the connection), else the index's folder (see index_dir)."""
    return index if is_catalog_url(index) else index_dir(index)


@dataclass(frozen=True)
class IndexSettings:
    """How an indexing run works; the defaults suit a laptop."""

    batch_size: int = 32  # images per model call and per committed transaction
    workers: int | None = None  # pictures decoded at once, overlapping the model; None: decoding_threads decides
    # Decode in a pool of `workers` processes (indexer.sources.decode_pool says why), or False: in
    # threads of the indexing process. None: processes where a run has pictures enough to repay
    # their start (PROCESSES_FROM) and there is more than one core.
    processes: bool | None = None
    gpu_jpegs: bool | None = None  # JPEGs decoded on the GPU (nvJPEG); None: where torch embeds on CUDA

    def decoding_threads(self, gpu: bool) -> int:
        """`workers`, else every core where a GPU embeds, and up to 4 where the CPU embeds too
        (the model's own threads need the other cores)."""
        cores = usable_cores()
        return self.workers or (cores if gpu else max(1, min(4, cores)))

    def decode_in_processes(self, pictures: int) -> bool:
        if self.processes is not None:
            return self.processes
        return pictures >= PROCESSES_FROM and usable_cores() > 1


# Pictures a run must have for decoding processes to pay: starting them takes about a second,
# in which threads decode a few dozen pictures.
PROCESSES_FROM = 200


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system tells it, e.g. in a container)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


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
