"""Which device embeds, and with which runtime: the CPU, an NVIDIA GPU, or Apple silicon's.

    placement = place("auto")                  # Placement("cuda:0", "onnx") with onnxruntime-gpu and a GPU
    placement = place("auto", queries=True)    # a search: the GPU only where ONNX Runtime can use it
    place("cuda:1")                            # DeviceError: what was found, and what to install

An NVIDIA GPU embeds through ONNX Runtime's CUDA provider where `onnxruntime-gpu` is installed
(the `gpu` extra), else through torch on CUDA. `auto` looks for a GPU without importing torch:
the NVIDIA driver lists its GPUs under /proc on Linux, so a machine without one (most laptops,
every CI runner) decides in microseconds, and a cold search stays torch-free. `mps` (Apple
silicon, through torch) is used when asked for, never by `auto`: open_clip's towers on it are
not measured here.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from importlib import util
from pathlib import Path

from indexer.errors import DeviceError

__all__ = ["DEVICES", "ONNX", "TORCH", "Placement", "parse", "place"]

DEVICES = "auto|cpu|cuda|cuda:N|mps"
ONNX, TORCH = "onnx", "torch"  # Placement.runtime: the runtime that can embed on the device
_GPU_DRIVER = Path("/proc/driver/nvidia/gpus")  # one folder per GPU while NVIDIA's driver is loaded
_INSTALL = "pip install 'clipseek[gpu]' (ONNX Runtime's CUDA provider), or a CUDA build of torch"


@dataclass(frozen=True)
class Placement:
    """Where embedding runs: `device` as torch names it ("cpu", "cuda:0", "mps"), and the
    runtime that must embed there (None on the CPU, where both can)."""

    device: str
    runtime: str | None = None

    @property
    def gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def cuda_index(self) -> int:
        return int(self.device.partition(":")[2] or 0)


CPU = Placement("cpu")


def parse(text: str) -> str:
    """A device name as given to --device, normalised ("CUDA" → "cuda:0"); DeviceError if it is none."""
    name = text.strip().lower()
    if name in ("auto", "cpu", "mps"):
        return name
    if match := re.fullmatch(r"cuda(?::([0-9]+))?", name):
        return f"cuda:{int(match.group(1) or 0)}"
    raise DeviceError(f"{text!r} is not a device: give one of {DEVICES}")


def place(asked: str = "auto", *, queries: bool = False) -> Placement:
    """The placement for a device asked for, or a DeviceError naming it, what was found, and the fix.

    `queries`: for a search or a server, which embed a text or a picture at a time: `auto` uses
    the GPU there only through ONNX Runtime, since loading torch onto a GPU (seconds) costs more
    than the GPU saves on a query (milliseconds on the CPU).
    """
    asked = parse(asked)
    if asked == "cpu":
        return CPU
    if asked == "mps":
        found = _torch_devices()
        if "mps" in found:
            return Placement("mps", TORCH)
        seen = f"torch here sees {', '.join(found)}" if found else "torch is not installed"
        raise DeviceError(f"mps is not available ({seen}): it is Apple silicon's GPU, through torch on macOS")
    gpus = nvidia_gpus()
    if asked == "auto":
        if gpus == 0:
            return CPU
        if _onnx_cuda():
            return Placement("cuda:0", ONNX)
        if queries or not util.find_spec("torch"):
            return CPU
        return Placement("cuda:0", TORCH) if "cuda:0" in _torch_devices() else CPU
    placement = Placement(asked, ONNX)
    if gpus is not None and placement.cuda_index >= gpus:
        found = f"{_count(gpus)} (cuda:0–cuda:{gpus - 1})" if gpus else f"no NVIDIA GPU ({_why_none()})"
        raise DeviceError(f"{asked} is not available: this machine has {found}; use --device cpu or auto")
    if _onnx_cuda():
        return placement
    torch_devices = _torch_devices()
    if asked in torch_devices:
        return Placement(asked, TORCH)
    if "cuda:0" in torch_devices:
        found = f"torch sees {_count(sum(d.startswith('cuda') for d in torch_devices))}"
        raise DeviceError(f"{asked} is not available: {found}; use --device cpu or auto")
    raise DeviceError(
        f"{asked} is not available: {_count(gpus) if gpus else 'an NVIDIA GPU'} is there, but neither ONNX "
        f"Runtime ({_onnx_build()}) nor torch ({_torch_build()}) here can use it: {_INSTALL}"
    )


def nvidia_gpus() -> int | None:
    """The NVIDIA GPUs this process may use, from the driver and CUDA_VISIBLE_DEVICES, without
    loading CUDA; None where that cannot be told without it (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        count = sum(1 for _ in _GPU_DRIVER.iterdir())
    except OSError:
        count = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # CUDA stops at the first entry it cannot use ("", "-1", NoDevFiles)
        usable = 0
        for entry in visible.split(","):
            if not re.fullmatch(r"[0-9]+|GPU-[0-9a-fA-F-]+|MIG-.+", entry.strip()):
                break
            usable += 1
        count = min(count, usable)
    return count


def _why_none() -> str:
    if not _GPU_DRIVER.is_dir():
        return "no NVIDIA driver is loaded"
    return f"none visible: CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}"


def _count(gpus: int) -> str:
    return f"{gpus} NVIDIA GPU" + ("s" if gpus != 1 else "")


def _onnx_cuda() -> bool:
    from indexer.models.onnx_encoder import cuda_provider  # onnxruntime: already the query path's

    return cuda_provider()


def _onnx_build() -> str:
    from importlib import metadata

    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _torch_devices() -> list[str]:
    if not util.find_spec("torch"):
        return []
    from indexer.models.encoder import torch_devices  # torch: only where a GPU may be used through it

    return torch_devices()


def _torch_build() -> str:
    from importlib import metadata

    try:
        return f"torch {metadata.version('torch')}"
    except metadata.PackageNotFoundError:
        return "not installed"
