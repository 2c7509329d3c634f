"""A real user's first run: how fast an offline machine learns that the model is missing, and
how fast each model `clipseek models` lists embeds here, relative to the default.

Offline failure: `clipseek index DIR --offline` with an empty model cache, the median of three
fresh processes, against `python -c "import torch"` in the same run (goal: at most a fifth of
it). Speeds: indexer.models.speed at random initialisation (speed does not depend on the
weights); a model whose text tower needs what is not installed here is said, not measured.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from indexer.errors import ModelError
from indexer.models.choices import CHOICES
from indexer.models.identity import DEFAULT_MODEL
from indexer.models.speed import measure

CLIPSEEK = str(Path(sys.executable).parent / "clipseek")
RUNS = 3


def _median_wall(command: list[str], env: dict) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(command, env=env, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _offline(scratch: Path) -> tuple[float, float]:
    pictures = scratch / "pictures"
    pictures.mkdir()
    Image.new("RGB", (64, 64), "red").save(pictures / "red.png")
    env = {**os.environ, "HF_HUB_CACHE": str(scratch / "hub"), "CLIPSEEK_HOME": str(scratch / "home")}
    failing = _median_wall([CLIPSEEK, "index", str(pictures), "--offline", "--quiet"], env)
    return failing, _median_wall([sys.executable, "-c", "import torch"], env)


def run(report: dict) -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory() as scratch:
        failing, torch_import = _offline(Path(scratch))
    report.update(offline_failure_s=failing, import_torch_s=torch_import)
    rows = [
        (
            "offline first run, model not cached",
            f"{failing:.2f} s",
            f"{failing / torch_import:.2f} of `import torch` ({torch_import:.2f} s; goal ≤ 0.2)",
        )
    ]
    base = measure(DEFAULT_MODEL)
    speeds = report.setdefault("speed_vs_default", {})
    for architecture in dict.fromkeys(choice.architecture for choice in CHOICES):
        try:
            speed = base if architecture == DEFAULT_MODEL else measure(architecture)
        except ModelError as error:
            rows.append((f"  {architecture}", "not measured", str(error).split(": pip")[0]))
            continue
        images, texts = speed.images_per_s / base.images_per_s, speed.texts_per_s / base.texts_per_s
        speeds[architecture] = {"images": images, "texts": texts}
        rows.append(
            (
                f"  {architecture}, random weights, torch",
                f"×{images:.2f} / ×{texts:.2f}",
                f"pictures / texts per second against {DEFAULT_MODEL} ({base.images_per_s:.1f} / "
                f"{base.texts_per_s:.1f} per s)",
            )
        )
    return rows
