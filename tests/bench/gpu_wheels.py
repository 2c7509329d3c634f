"""Download into gpu-wheels/ the wheels gpu_check.sh installs on a machine without the network that
has torch, torchvision, numpy and Pillow: what clipseek's indexing needs besides, at the versions
installed here, for that machine's Python.

    python -m tests.bench.gpu_wheels --python-version 3.12     # then carry gpu-wheels/ with the checkout
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata

NEEDED = ("open_clip_torch", "faiss-cpu", "sqlalchemy", "ftfy", "regex", "tqdm", "click", "pyyaml", "safetensors")
NEEDED += ("tokenizers",)  # the export's Hugging Face tokenizers, which onnx_encoder imports
# The machine's own: torch and what torch itself requires, whose versions must stay torch's.
PRESENT = {"torch", "torchvision", "numpy", "pillow", "filelock", "fsspec", "jinja2", "markupsafe", "networkx"}
PRESENT |= {"sympy", "mpmath", "typing-extensions", "setuptools", "triton"}


def _name(requirement: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def closure() -> dict[str, str]:
    """name → installed version, for NEEDED and everything they require here (their extras left out)."""
    found: dict[str, str] = {}
    todo = [_name(name) for name in NEEDED]
    while todo:
        name = todo.pop()
        if name in found or name in PRESENT or name.startswith("nvidia-"):
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # a requirement of another platform or Python
            continue
        for requirement in metadata.requires(name) or []:
            if "extra ==" not in requirement:
                todo.append(_name(requirement))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}")
    parser.add_argument("--dest", default="gpu-wheels")
    args = parser.parse_args()
    pins = [f"{name}=={version}" for name, version in sorted(closure().items())]
    platforms = ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64"]
    platforms += ["--platform", "manylinux_2_17_x86_64", "--platform", "linux_x86_64"]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--dest", args.dest, "--python-version", args.python_version, *platforms, *pins]
    print(" ".join(pins))
    subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
