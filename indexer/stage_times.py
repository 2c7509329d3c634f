"""Where an index run's time goes, and which stage holds it back.

The indexing thread does three things in turn: it waits for decoded pictures, it embeds a batch,
and it writes a batch to the index. Decoding runs beside both, in other processes or threads.
So the time that thread spends waiting for pictures is time decoding held the run back; the
time it spends embedding or writing is time the decoders were ahead. The stage with the most
seconds is the bottleneck: more cores (--decode-workers) help decoding, a GPU helps embedding,
a faster disk helps writing.

    times = StageTimes()
    with times.timing("embed"):
        ...
    times.bottleneck      # "embed"
    times.describe()      # "decode 12% · embed 80% · write 8%"
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["STAGES", "StageTimes"]

STAGES = ("decode", "embed", "write")


@dataclass
class StageTimes:
    """Seconds the indexing thread spent in each stage: `decode` waiting for decoded pictures
    (and decoding on the GPU, where it does), `embed` in the model, `write` in the index."""

    decode: float = 0.0
    embed: float = 0.0
    write: float = 0.0

    def add(self, stage: str, seconds: float) -> None:
        setattr(self, stage, getattr(self, stage) + seconds)

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - started)

    @property
    def total(self) -> float:
        return self.decode + self.embed + self.write

    @property
    def bottleneck(self) -> str | None:
        """The stage that took the most of the indexing thread's time; None before any was timed."""
        if self.total <= 0:
            return None
        return max(STAGES, key=lambda stage: getattr(self, stage))

    def shares(self) -> dict[str, float]:
        total = self.total or 1.0
        return {stage: getattr(self, stage) / total for stage in STAGES}

    def describe(self) -> str:
        """Each stage's share of the time, "decode 12% · embed 80% · write 8%"; "" before any was timed."""
        if self.total <= 0:
            return ""
        return " · ".join(f"{stage} {share:.0%}" for stage, share in self.shares().items())
