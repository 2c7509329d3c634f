"""Which kind of vector index fits a collection: exact while it is fast enough, then approximate.

    choose(count=1_000_000, dim=512)                  # ivf: exact search is too slow, 4 GiB holds the vectors
    choose(count=10_000_000, dim=512, budget=4 << 30) # ivfpq: only compressed codes fit

Exact search is the quality reference (compressed indexes visibly hurt text→image results), so
`auto` keeps `flat` while one exact search takes at most the latency budget (default 10 ms) on
the machine that decides: timed there (vectors.exact_search_ms), not assumed, because a NAS or
an old laptop scans several times slower than a fast desktop. Past the budget it moves to `ivf`
(full vectors in clusters: re-ranked scores are exact) while the memory budget holds 4·dim bytes
per vector, then to `ivfpq` with the largest codes that fit. Where exact search was nearly fast
enough (under CLOSE times the budget) the approximate kind must reach recall@10 0.99, so that
the switch is invisible; beyond, 0.95. `hnsw` answers faster than `ivf` at the same recall but
takes far longer to build on a few cores and cannot lose items without a rebuild, so it is
there to be asked for, not chosen.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from indexer.errors import StoreError
from indexer.store.vectors import KINDS, IndexSpec, exact_search_ms

__all__ = ["DEFAULT_BUDGET", "DEFAULT_LATENCY_MS", "Decision", "check_kind", "choose", "parse_latency", "parse_size"]

DEFAULT_BUDGET = 4 << 30
DEFAULT_LATENCY_MS = 10.0
MIN_PER_CLUSTER = 39  # FAISS's floor of training vectors per IVF cluster
CLOSE = 4.0  # exact search under CLOSE × the latency budget: the approximate kind must reach CLOSE_RECALL
CLOSE_RECALL, RECALL = 0.99, 0.95
BACK_TO_EXACT = 0.8  # an approximate kind turns exact again only clearly under the budget, not on timing noise


@dataclass(frozen=True)
class Decision:
    """Why `auto` chose a kind: one exact search's time here against the latency budget."""

    kind: str
    count: int
    exact_ms: float
    latency_ms: float

    def describe(self) -> str:
        within = "within" if self.kind == "flat" else "over"
        took = f"exact search of {self.count:,} took {self.exact_ms:.1f} ms here"
        return f"{took}, {within} the {self.latency_ms:g} ms budget"

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(text: str) -> int:
    """Bytes from "4G", "512M", "800k" or a plain number (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not match:
        raise StoreError(f"a memory budget is a size like 4G, 512M or 800k, not {text!r}")
    number, unit = float(match[1]), match[2].lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def parse_latency(text: str) -> float:
    """Milliseconds from "10", "10ms" or "0.5s"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*", str(text))
    if not match or float(match[1]) <= 0:
        raise StoreError(f"a latency budget is a time like 10ms or 0.5s, not {text!r}")
    return float(match[1]) * (1000 if match[2] == "s" else 1)


def choose(
    count: int,
    dim: int,
    kind: str = "auto",
    budget: int = DEFAULT_BUDGET,
    latency_ms: float = DEFAULT_LATENCY_MS,
    current: str | None = None,
    exact_ms: float | None = None,
) -> tuple[IndexSpec, Decision | None]:
    """The spec to build for `count` vectors of `dim` within `budget` bytes (search settings
    untuned), and for `auto` the decision behind it. `current` is the kind the vectors have now;
    `exact_ms`, one exact search's time, is measured here when not given."""
    check_kind(kind)
    nlist = _nlist(count)
    decision, target = None, RECALL
    if kind == "auto" and nlist is None:
        kind = "flat"  # too few vectors to train clusters on: exact search, whatever its time
    elif kind == "auto":
        exact_ms = exact_search_ms(count, dim) if exact_ms is None else exact_ms
        limit = latency_ms * (BACK_TO_EXACT if current not in (None, "flat") else 1)
        if exact_ms <= limit:
            kind = "flat"
        elif count * IndexSpec("ivf").bytes_per_vector(dim) <= budget:
            kind = "ivf"
        else:
            kind = "ivfpq"
        decision = Decision(kind, count, round(exact_ms, 2), latency_ms)
        target = CLOSE_RECALL if exact_ms < CLOSE * latency_ms else RECALL
    if kind in ("ivf", "ivfpq") and nlist is None:
        raise StoreError(f"{kind} needs at least {16 * MIN_PER_CLUSTER} vectors to train on; there are {count}")
    nprobe = max(1, (nlist or 0) // 64)  # a start: tune() raises it until the recall is met
    spec = {
        "flat": IndexSpec("flat"),
        "hnsw": IndexSpec("hnsw", links=32, ef_search=64, target=target),
        "ivf": IndexSpec("ivf", nlist=nlist, nprobe=nprobe, target=target),
        "ivfpq": IndexSpec(
            "ivfpq", nlist=nlist, nprobe=nprobe, code_bytes=_code_bytes(count, dim, budget), target=target
        ),
    }[kind]
    need = count * spec.bytes_per_vector(dim)
    if need > budget:
        raise StoreError(
            f"{count:,} vectors as {kind} need {need / 2**30:.1f} GiB, over the memory budget of "
            f"{budget / 2**30:.1f} GiB: give a larger --memory-budget or another --index-type"
        )
    return spec, decision


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
