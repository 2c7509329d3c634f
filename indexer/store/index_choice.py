"""Which kind of vector index fits a collection: exact while it is fast enough, then approximate.

    choose(count=1_000_000, dim=512)                  # ivf: 4 GiB holds the full vectors
    choose(count=10_000_000, dim=512, budget=4 << 30) # ivfpq: only compressed codes fit

Exact search is the quality reference (compressed indexes visibly hurt text→image results), so
`auto` keeps `flat` up to FLAT_UP_TO vectors, where a query still takes tens of milliseconds on
two cores; then `ivf` (full vectors in clusters: re-ranked scores are exact) while the budget
holds 4·dim bytes per vector; then `ivfpq` with the largest codes that fit. `hnsw` answers
faster than `ivf` at the same recall but takes far longer to build on a few cores and cannot
lose items without a rebuild, so it is there to be asked for, not chosen.
"""

from __future__ import annotations

import math
import re

from indexer.errors import StoreError
from indexer.store.vectors import KINDS, IndexSpec

__all__ = ["DEFAULT_BUDGET", "FLAT_UP_TO", "check_kind", "choose", "parse_size"]

FLAT_UP_TO = 250_000
DEFAULT_BUDGET = 4 << 30
MIN_PER_CLUSTER = 39  # FAISS's floor of training vectors per IVF cluster


def parse_size(text: str) -> int:
    """Bytes from "4G", "512M", "800k" or a plain number (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not match:
        raise StoreError(f"a memory budget is a size like 4G, 512M or 800k, not {text!r}")
    number, unit = float(match[1]), match[2].lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def choose(count: int, dim: int, kind: str = "auto", budget: int = DEFAULT_BUDGET) -> IndexSpec:
    """The spec to build for `count` vectors of `dim` within `budget` bytes; search settings untuned."""
    check_kind(kind)
    nlist = _nlist(count)
    if kind == "auto":
        if count <= FLAT_UP_TO or nlist is None:
            kind = "flat"
        elif count * IndexSpec("ivf").bytes_per_vector(dim) <= budget:
            kind = "ivf"
        else:
            kind = "ivfpq"
    if kind in ("ivf", "ivfpq") and nlist is None:
        raise StoreError(f"{kind} needs at least {16 * MIN_PER_CLUSTER} vectors to train on; there are {count}")
    nprobe = max(1, (nlist or 0) // 64)  # a start: tune() raises it until the recall is met
    spec = {
        "flat": IndexSpec("flat"),
        "hnsw": IndexSpec("hnsw", links=32, ef_search=64),
        "ivf": IndexSpec("ivf", nlist=nlist, nprobe=nprobe),
        "ivfpq": IndexSpec("ivfpq", nlist=nlist, nprobe=nprobe, code_bytes=_code_bytes(count, dim, budget)),
    }[kind]
    need = count * spec.bytes_per_vector(dim)
    if need > budget:
        raise StoreError(
            f"{count:,} vectors as {kind} need {need / 2**30:.1f} GiB, over the memory budget of "
            f"{budget / 2**30:.1f} GiB: give a larger --memory-budget or another --index-type"
        )
    return spec


def check_kind(kind: str) -> None:
    if kind not in ("auto", *KINDS):
        raise StoreError(f"the index type must be one of auto, {', '.join(KINDS)}, not {kind!r}")


def _nlist(count: int) -> int | None:
    """Clusters for IVF: a power of two near 2·√count (the low end of FAISS's advice, as training
    and adding cost grow with it on a few cores), with enough vectors to train each."""
    if count < 16 * MIN_PER_CLUSTER:
        return None
    nlist = 2 ** round(math.log2(2 * math.sqrt(count)))
    return int(min(max(nlist, 16), 65_536, 2 ** int(math.log2(count // MIN_PER_CLUSTER))))


def _code_bytes(count: int, dim: int, budget: int) -> int:
    """The largest product-quantiser code (dividing dim, at most dim/2 bytes) that fits the budget."""
    for size in (64, 48, 32, 16, 8):
        if dim % size == 0 and size <= dim // 2 and count * (size + 8) <= budget:
            return size
    return 8
