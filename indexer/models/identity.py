"""Model names, defaults and identity, without importing torch (the encoder loads models).

An index stores a ModelId, so that it can tell the model that made its vectors from any other,
and reopen it later without being told.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from indexer.errors import ModelError

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
DEMO_MODEL = "demo"
RANDOM_WEIGHTS = "random"  # explicit random initialisation, for benchmarks and tests


@dataclass(frozen=True)
class ModelId:
    """Which model made a set of vectors.

    Weights are named by their pretrained tag, or by the sha256 of the checkpoint file they came
    from (the bundled demo model included), so a renamed file is still the same model.
    """

    architecture: str
    pretrained: str | None
    checkpoint_sha256: str | None
    dim: int
    image_size: int | tuple[int, int]

    def __str__(self) -> str:
        weights = self.pretrained or f"sha256:{self.checkpoint_sha256[:12]}"
        return f"{self.architecture} ({weights}, {self.dim}-d, {self.image_size} px)"

    @property
    def side(self) -> int:
        """The model's input size in pixels (the larger side, for a non-square input)."""
        return self.image_size if isinstance(self.image_size, int) else max(self.image_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelId:
        size = data["image_size"]
        return cls(**{**data, "image_size": size if isinstance(size, int) else tuple(size)})


def _demo_dir() -> Path:
    # An installed wheel carries data/ as indexer/_demo/; a source checkout uses data/ itself.
    package = Path(__file__).resolve().parent.parent
    for folder in (package / "_demo", package.parent / "data"):
        if (folder / "demo.json").is_file():
            return folder
    raise ModelError("the bundled demo model is missing from this installation: reinstall clipseek")


def demo_config() -> Path:
    """The bundled demo model's open_clip config (registered under the name `demo`)."""
    return _demo_dir() / "demo.json"


def demo_checkpoint() -> Path:
    """The bundled demo model's weights (safetensors)."""
    return _demo_dir() / "demo.safetensors"


def demo_tokenizer() -> Path:
    """The bundled demo model's tokenizer: a folder with tokenizer.json, as Hugging Face models ship it."""
    return _demo_dir() / "demo_tokenizer"


def sha256_file(path: str | bytes | Path) -> str:
    """The sha256 of a file's content, read in blocks."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
