"""Indexing on a GPU: the encoder alone on ready tensors, decoding alone with every core (and
JPEGs on the GPU, nvJPEG), and `clipseek index` end to end, at float32 and float16, beside
clip-retrieval's published figure.

    OUT=report python -m tests.bench.gpu_check                   # ViT-B-32 at random weights, 1,024 JPEGs
    python -m tests.bench.gpu_check --pictures 8 --model demo    # the same steps in a minute, on any machine

tests/bench/gpu_check.sh runs it on a machine that lacks some of clipseek's dependencies (see
the README's "Devices"). Pictures are generated phone-size JPEGs (4000 × 3000, textured, about
3 MB each). The device is the one `clipseek index --device auto` picks; the model embeds through
torch there (the float16 rows need it: ONNX Runtime embeds in float32). The report is written to
$OUT (or --out) as gpu-check.json and gpu-check.md after every step, so a run cut short keeps
what it measured. Goal: end to end ≥ 0.9 of the slower of (encoder alone, decoding alone with
every core); each end-to-end row gives that ratio and the stage its run waited on most.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from indexer.config import IndexSettings, usable_cores
from indexer.models import devices
from indexer.models.encoder import Encoder, load_encoder
from indexer.models.gpu_jpegs import GpuJpegs
from indexer.models.identity import RANDOM_WEIGHTS
from indexer.pipeline import Indexer, IndexReport
from indexer.sources.pictures import jpeg_header, prepare_picture
from indexer.store import Store

CLIP_RETRIEVAL = "1,400–1,500 /s on an RTX 3080 (clip-retrieval's README, ViT-B-32)"
GOAL = 0.9  # end to end, of the slower of the encoder alone and decoding alone
BATCH = IndexSettings().batch_size


def _write_photo(path: Path, seed: int) -> None:
    """A 4000 × 3000 JPEG that compresses like a photo: smooth shapes from a coarse grid, plus grain."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((4000, 3000), Image.BICUBIC)
    grain = rng.integers(-12, 13, (3000, 4000, 1), dtype=np.int16)
    pixels = np.clip(np.asarray(coarse, np.int16) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def phone_library(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"IMG_{number:05d}.jpg" for number in range(count)]
    with _processes() as pool:
        list(pool.map(_write_photo, paths, range(count)))
    return paths


def _processes() -> ProcessPoolExecutor:
    # Spawned, not forked: a fork of a process whose torch or ONNX Runtime threads hold locks hangs.
    return ProcessPoolExecutor(usable_cores(), mp_context=multiprocessing.get_context("spawn"))


def _rate(count: int, work) -> float:
    started = time.perf_counter()
    work()
    return count / (time.perf_counter() - started)


def _prepare(path: Path, side: int, preprocess):
    return prepare_picture(os.fsencode(path), None, side, preprocess).pixels


def decode_rate(pool: Executor, paths: list[Path], side: int, preprocess) -> float:
    """Pictures/s decoded and preprocessed (what the indexer's workers do), every core busy."""

    def work():
        list(pool.map(_prepare, paths, [side] * len(paths), [preprocess] * len(paths), chunksize=4))

    work()  # warm: the page cache, the pool's processes
    return _rate(len(paths), work)


def gpu_decode_rate(paths: list[Path], encoder: Encoder, device: str) -> float:
    """Pictures/s read and parsed on every core, decoded and preprocessed on the GPU in batches."""
    decoder = GpuJpegs(encoder.pixel_preprocess, device)

    def work():
        with ThreadPoolExecutor(usable_cores()) as pool:
            headers = list(pool.map(jpeg_header, [os.fsencode(path) for path in paths], [None] * len(paths)))
        for start in range(0, len(headers), BATCH):
            decoder.prepare(headers[start : start + BATCH])
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    work()
    return _rate(len(paths), work)


def encoder_rate(encoder: Encoder, ready: list, batch: int) -> float:
    def work():
        for start in range(0, len(ready), batch):
            encoder.embed_preprocessed(ready[start : start + batch])
        if encoder.device.startswith("cuda"):
            torch.cuda.synchronize()

    work()  # warm: kernel selection, allocations
    return _rate(len(ready), work)


def index_rate(
    encoder: Encoder, library: Path, scratch: Path, settings: IndexSettings, placement: devices.Placement
) -> tuple[float, IndexReport]:
    """`clipseek index` of the library into a new index, as Indexer.index runs it, with this encoder."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    report = IndexReport()
    store = Store.open(folder / "index", write=True, create=True)
    with Indexer(store, lambda: encoder, settings, placement=placement) as indexer:
        indexer.store.claim_model(encoder.model_id, None)
        indexer.index([library], report=report)
    assert report.embedded == len(list(library.iterdir())), report
    return report.embedded / report.seconds, report


def cli_run(library: Path, scratch: Path, model: str, pretrained: str | None) -> str:
    """The summary lines of `clipseek index --device auto`, run as a user runs it."""
    env = {**os.environ, "CLIPSEEK_HOME": str(scratch / "cli-home"), "CLIPSEEK_CACHE": str(scratch / "cli-cache")}
    command = [sys.executable, "-c", "from search.cli.main import main; main()", "index", str(library), "-q"]
    command += ["--model", model] + (["--pretrained", pretrained] if pretrained else [])
    run = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = run.stderr.strip().splitlines()
    return " / ".join(lines[-2:]) if lines else f"exit status {run.returncode}"  # the bottleneck, the summary


class Report:
    def __init__(self, out: Path, facts: dict):
        self.out = out
        self.facts = facts
        self.rows: list[tuple[str, str, str]] = []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, value: float | str, note: str = "", key: str | None = None) -> None:
        shown = f"{value:,.0f} /s" if isinstance(value, float) else value
        self.rows.append((name, shown, note))
        if key:
            self.facts[key] = value
        self.write()

    def write(self) -> None:
        (self.out / "gpu-check.json").write_text(json.dumps({**self.facts, "rows": self.rows}, indent=2))
        table = ["| step | pictures/s | note |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in self.rows)]
        facts = [f"- {key}: {value}" for key, value in self.facts.items() if not isinstance(value, float)]
        (self.out / "gpu-check.md").write_text("\n".join(["# clipseek on a GPU", "", *facts, "", *table, ""]))
        print(table[-1], flush=True)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check"), help="report folder [$OUT]")
    parser.add_argument("--pictures", type=int, default=1024)
    parser.add_argument("--model", default="ViT-B-32", help="ViT-B-32 (random weights) or demo")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    pretrained = None if args.model == "demo" else RANDOM_WEIGHTS
    placement = devices.place(args.device)
    device = placement.device if placement.gpu else "cpu"
    cores = os.cpu_count() or 1
    report = Report(
        Path(args.out),
        {
            "model": f"{args.model} ({pretrained or 'bundled weights'})",
            "device": f"{device}: {_device_name(device)}",
            "auto picks": f"{placement.device} ({placement.runtime or 'either runtime'})",
            "cores": cores,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "pictures": args.pictures,
            "beside": CLIP_RETRIEVAL,
        },
    )
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        started = time.perf_counter()
        paths = phone_library(scratch / "library", args.pictures)
        megabytes = sum(path.stat().st_size for path in paths) / len(paths) / 1e6
        report.facts["photos"] = (
            f"4000×3000 JPEG, {megabytes:.1f} MB each, written in {time.perf_counter() - started:.0f} s"
        )

        encoder = load_encoder(args.model, pretrained, device="cpu").to_device(device, half=False)
        side = encoder.model_id.side
        report.facts["float16 cosine to float32"] = f"{encoder.half_precision_cosine():.5f} (at least 0.999 to be used)"
        ready = [_prepare(path, side, encoder.preprocess) for path in paths[: max(BATCH, min(len(paths), 256))]]

        with ThreadPoolExecutor(cores) as pool:
            threads = decode_rate(pool, paths, side, encoder.pixel_preprocess)
        report.add(f"decoding alone, {cores} threads", threads, "the GIL's share shows here", "decode_threads")
        with _processes() as pool:
            processes = decode_rate(pool, paths, side, encoder.pixel_preprocess)
        report.add(f"decoding alone, {cores} processes", processes, "every core", "decode_processes")
        decoding = max(threads, processes)
        on_gpu = gpu_decode_rate(paths, encoder, device)
        report.add(f"JPEGs decoded on {device} (torchvision)", on_gpu, "headers on every core", "decode_gpu")
        on_cuda = device.startswith("cuda")
        if on_cuda:  # nvJPEG: the indexer uses it there by default
            decoding = max(decoding, on_gpu)
        torch_placement = devices.Placement(device, devices.TORCH) if on_cuda else devices.CPU

        for half in (False, True):
            precision = "float16" if half else "float32"
            encoder.to_device(device, half=half)
            alone = encoder_rate(encoder, ready, BATCH)
            report.add(
                f"encoder alone, {precision}, batch {BATCH}", alone, f"on {encoder.runs_on}", f"encoder_{precision}"
            )
            wide = encoder_rate(encoder, ready, 256)
            report.add(f"encoder alone, {precision}, batch 256", wide, "", f"encoder_{precision}_256")
            bound = min(alone, decoding)
            runs = {"decode pool": IndexSettings(processes=True, gpu_jpegs=False)}
            if on_cuda:
                runs["decode pool + nvJPEG"] = IndexSettings(processes=True, gpu_jpegs=True)
            for name, settings in runs.items():
                rate, run = index_rate(encoder, scratch / "library", scratch, settings, torch_placement)
                ratio = rate / bound
                report.add(
                    f"clipseek index, {precision}, {name}",
                    rate,
                    f"{ratio:.2f} of min(encoder, decoding) (goal ≥ {GOAL}); decoded in {run.decoders}; "
                    f"bottleneck {run.stages.bottleneck} ({run.stages.describe()}); clip-retrieval: 1,400–1,500 /s",
                    f"index_{precision}_{name.replace(' ', '_').replace('+', 'and')}",
                )
                report.facts[f"ratio_{precision}_{name}"] = f"{ratio:.2f} (goal ≥ {GOAL})"
        report.add(
            "clipseek index --device auto (the command)", cli_run(scratch / "library", scratch, args.model, pretrained)
        )


if __name__ == "__main__":
    main()
