"""A real user's first run: how fast an offline machine learns that the model is missing, and
how fast each model `clipseek models` lists embeds here, relative to the default.

Offline failure: `clipseek index DIR --offline` with an empty model cache, the median of three
fresh processes, against `python -c "import torch"` in the same run (goal: at most a fifth of
it). Speeds: `clipseek models --bench` (indexer.models.speed) at random initialisation (speed
does not depend on the weights); a model whose text tower needs what is not installed here is
said, not measured. The models that read a Hugging Face tokenizer (and XLM-RoBERTa's text tower
configuration) from the hub get them from a hub on loopback, built in each family's format
(tests/hf_tokenizer_files.py) with xlm-roberta-base's published configuration: the
architectures are the real ones, so their speed is.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from indexer.models import hub
from indexer.models.choices import CHOICES
from indexer.models.identity import DEFAULT_MODEL
from tests.hf_text_towers import XLM_ROBERTA_BASE
from tests.hf_tokenizer_files import siglip_t5, xlm_roberta_as_on_the_hub
from tests.hub_server import serving_hub

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
    architectures = list(dict.fromkeys(choice.architecture for choice in CHOICES))
    measured = _speeds(architectures)
    base = measured[DEFAULT_MODEL]
    speeds = report.setdefault("speed_vs_default", {})
    for architecture in architectures:
        speed = measured.get(architecture)
        if isinstance(speed, str):
            rows.append((f"  {architecture}", "not measured", speed.split(": pip")[0]))
            continue
        images, texts = speed["images_per_s"] / base["images_per_s"], speed["texts_per_s"] / base["texts_per_s"]
        speeds[architecture] = {"images": images, "texts": texts}
        rows.append(
            (
                f"  {architecture}, random weights, torch",
                f"×{images:.2f} / ×{texts:.2f}",
                f"pictures / texts per second against {DEFAULT_MODEL} ({base['images_per_s']:.1f} / "
                f"{base['texts_per_s']:.1f} per s)",
            )
        )
    return rows


def _speeds(architectures: list[str]) -> dict[str, dict | str]:
    """Each architecture's `clipseek models --bench` figures, or why it could not be measured."""
    with tempfile.TemporaryDirectory() as scratch, serving_hub(_tokenizer_repos(Path(scratch))) as server:
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(Path(scratch) / "hub")}
        for name in ("HF_HUB_OFFLINE", "CLIPSEEK_OFFLINE"):
            env.pop(name, None)
        found: dict[str, dict | str] = {}
        # All in one process, so that each is set against the same measure of the default; where
        # that fails, one at a time, so that a model that cannot load says why.
        for batch in [architectures, *([name] for name in architectures)]:
            run = subprocess.run(
                [CLIPSEEK, "models", "--bench", *batch, "--json"], env=env, capture_output=True, text=True
            )
            if run.returncode == 0:
                found |= {row["model"]: row for row in json.loads(run.stdout)}
                if len(batch) > 1:
                    return found
            elif len(batch) == 1:
                found[batch[0]] = run.stderr.strip().splitlines()[-1].removeprefix("Error: ")
        return found


def _tokenizer_repos(scratch: Path) -> dict[str, dict[str, bytes]]:
    """The hub repositories of the listed models' tokenizers, built in their families' formats."""
    builders = {"xlm-roberta-base": xlm_roberta_as_on_the_hub}
    repos = {}
    for choice in CHOICES:
        for repo in hub.text_repos(choice.architecture):
            folder = builders.get(repo, siglip_t5)(scratch / repo.replace("/", "--"))
            if repo == "xlm-roberta-base":
                (folder / "config.json").write_text(json.dumps(XLM_ROBERTA_BASE), encoding="utf-8")
            repos[repo] = {path.name: path.read_bytes() for path in folder.iterdir()}
    return repos
