"""Which runtime embeds for an index: ONNX Runtime from the model's export, else torch.

    encoder = backend.load(model_id, load_torch)   # an OnnxEncoder, or load_torch()'s Encoder

The export of a model lives in the model cache (config.cache_home()/models/), under a name
derived from its ModelId, so every index of the same model shares it. `auto` (the default, or
CLIPSEEK_BACKEND=auto) uses the export and makes it on first need where there is none: that
costs one torch load and a few seconds to a minute, once. A model that cannot be exported is
remembered with the reason (until torch or open_clip change) and embeds with torch. A damaged
export, or one of another model, is made again with a warning. CLIPSEEK_BACKEND=torch never
uses an export; CLIPSEEK_BACKEND=onnx fails rather than fall back to torch; CLIPSEEK_BACKEND=int8
is `onnx` with the export's 8-bit towers for pictures too (opt-in: about twice as fast, slightly
different vectors). Queries' texts take the 8-bit text tower wherever the export measured it
faithful (OnnxEncoder).

The device (indexer.models.devices) comes first: a GPU that only torch can use makes torch embed
whatever the backend, except `onnx` and `int8`, which then fail with what to install.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from importlib import metadata, util
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.config import cache_home
from indexer.errors import ClipseekError, ClipseekWarning, ModelError, ModelMismatchError
from indexer.models import devices, hub
from indexer.models.identity import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    DEMO_MODEL,
    ModelId,
    demo_checkpoint,
    sha256_file,
)
from indexer.models.onnx_encoder import INT8_COSINE, ExportBrokenError, OnnxEncoder, read_manifest

if TYPE_CHECKING:
    from indexer.models.encoder import Encoder
    from indexer.store import Store

__all__ = [
    "BACKENDS",
    "chosen",
    "describe",
    "encoder_for",
    "encoder_of",
    "export_dir",
    "exported",
    "exported_model",
    "load",
]

log = logging.getLogger("clipseek")

BACKENDS = ("auto", "onnx", "int8", "torch")


def chosen() -> str:
    backend = os.environ.get("CLIPSEEK_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ModelError(f"CLIPSEEK_BACKEND must be one of {', '.join(BACKENDS)}, not {backend!r}")
    return backend


def export_dir(model_id: ModelId) -> Path:
    """The folder of a model's ONNX export in the model cache."""
    key = hashlib.sha256(json.dumps(model_id.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id.architecture)
    return cache_home() / "models" / f"{safe}-{key}"


def load(
    model_id: ModelId,
    load_torch: Callable[[], Encoder],
    backend: str | None = None,
    placement: devices.Placement = devices.CPU,
) -> Encoder | OnnxEncoder:
    """An encoder for `model_id` on `placement`'s device: its export through ONNX Runtime where
    there is (or can be) one and ONNX Runtime can use the device, else torch.

    `load_torch` loads the model with torch on the CPU; it is called only to make the export or
    to embed (then moved to the device).
    """
    backend = backend or chosen()
    with_torch = functools.cache(load_torch)  # loaded at most once, and only if needed

    def on_device() -> Encoder:
        return with_torch().to_device(placement.device)

    if placement.runtime == devices.TORCH:
        if backend in ("onnx", "int8"):
            raise ModelError(
                f"CLIPSEEK_BACKEND={backend}, but ONNX Runtime cannot use {placement.device} here: "
                "pip install 'clipseek[gpu]' for its CUDA provider, or use --device cpu"
            )
        return on_device()
    if backend == "torch":
        return on_device()
    folder = export_dir(model_id)

    def rebuild(error: ExportBrokenError) -> None:
        warnings.warn(f"{error}; exporting it again", ClipseekWarning, stacklevel=2)
        _export(with_torch(), folder)

    rebuild_if_possible = rebuild if util.find_spec("torch") else None
    int8 = "all" if backend == "int8" else "faithful"
    refused = _refusal(folder)
    if refused is not None:
        if backend != "auto":
            raise ModelError(f"{model_id} has no ONNX path: {refused}")
        return on_device()
    try:
        return OnnxEncoder(folder, model_id, rebuild_if_possible, int8, placement.device)
    except ExportBrokenError as error:
        if rebuild_if_possible is None:
            raise ModelError(f"{error}, and torch is not installed to export it again") from None
        if folder.exists():
            warnings.warn(f"{error}; exporting it again", ClipseekWarning, stacklevel=2)
    from indexer.models.onnx_export import NotExportableError

    try:
        _export(with_torch(), folder)
    except NotExportableError as error:
        _refuse(folder, str(error))
        if backend != "auto":
            raise
        return on_device()
    return OnnxEncoder(folder, model_id, rebuild_if_possible, int8, placement.device)


def _export(encoder: Encoder, folder: Path) -> None:
    from indexer.models.onnx_export import export

    log.info(f"exporting {encoder.model_id} to ONNX, once, for fast queries without torch ({folder})")
    export(encoder, folder)
    _refusal_file(folder).unlink(missing_ok=True)


def describe(model_id: ModelId) -> str:
    """Which runtime embeds for this model, and why: for `clipseek status`."""
    backend = chosen()
    if backend == "torch":
        return "torch (CLIPSEEK_BACKEND=torch)"
    folder = export_dir(model_id)
    refused = _refusal(folder)
    if refused is not None:
        return f"torch: {refused}"
    try:
        manifest = read_manifest(folder)
    except ExportBrokenError:
        return "ONNX Runtime, once the first query exports the model (one torch load)"
    if manifest.get("model") != model_id.to_dict():
        return f"ONNX Runtime, once the export at {folder} (of another model) is made again"
    if backend == "int8":
        return f"ONNX Runtime, int8 weights ({folder})"
    cosine = manifest["text_int8"]["cosine"]
    if cosine >= INT8_COSINE:
        return f"ONNX Runtime ({folder}); texts through int8 weights (cosine ≥ {cosine:.4f} to float32)"
    return f"ONNX Runtime ({folder}); texts in float32 (int8 weights reached only cosine {cosine:.4f})"


def exported(model_id: ModelId) -> bool | None:
    """Whether the model runs on the fast path: True where its export is ready, False where
    exporting it was refused (with the torch, open_clip and exporter installed now), None where not tried."""
    folder = export_dir(model_id)
    if _refusal(folder) is not None:
        return False
    try:
        return read_manifest(folder).get("model") == model_id.to_dict() or None
    except ExportBrokenError:
        return None


def exported_model(model: str | None, pretrained: str | None, checkpoint: str | os.PathLike | None) -> ModelId | None:
    """The identity of the model that `model`, `pretrained` and `checkpoint` name (as
    load_encoder resolves them), read from its export in the model cache without torch; None
    where the cache holds no export of it, or where only loading it can tell (a hub model).

    So a new index of a model exported before starts in a second rather than after a torch load
    of several. The export's manifest records the identity that torch computed for the same
    architecture, tag and weights' sha256."""
    model = model or DEFAULT_MODEL
    if model.startswith(hub.HF_HUB_PREFIX):
        return None
    if model == DEMO_MODEL and checkpoint is None and pretrained is None:
        checkpoint = demo_checkpoint()
    if checkpoint is not None:
        pretrained = None
    elif pretrained is None and model != DEFAULT_MODEL:
        return None  # load_encoder says which weights to name
    else:
        pretrained = pretrained or DEFAULT_PRETRAINED
    candidates = []
    for manifest in sorted((cache_home() / "models").glob("*/manifest.json")):
        try:
            recorded = read_manifest(manifest.parent)["model"]
            if recorded["architecture"] == model and recorded["pretrained"] == pretrained:
                candidates.append(recorded)
        except (ExportBrokenError, KeyError, TypeError):
            continue  # not an export this can read: loading the model decides
    if candidates and checkpoint is not None:  # hashed only where an export may be of these weights
        if not os.path.isfile(checkpoint):
            return None
        sha256 = sha256_file(checkpoint)
        candidates = [recorded for recorded in candidates if recorded.get("checkpoint_sha256") == sha256]
    return ModelId.from_dict(candidates[0]) if candidates else None


def encoder_for(
    store: Store,
    checkpoint: str | os.PathLike | None = None,
    offline: bool | None = None,
    placement: devices.Placement = devices.CPU,
) -> Encoder | OnnxEncoder:
    """The model an index was made with (see encoder_of), from the checkpoint path the index
    recorded unless `checkpoint` says where the file is now (Indexer.open and SearchEngine.open
    have checked it is the index's)."""
    stored = store.model_id
    if stored is None:
        raise ClipseekError(f"the index at {store.root} has no model yet: index something into it first")
    return encoder_of(stored, checkpoint or store.model_checkpoint, offline, placement)


def encoder_of(
    model_id: ModelId,
    checkpoint: str | os.PathLike | None = None,
    offline: bool | None = None,
    placement: devices.Placement = devices.CPU,
) -> Encoder | OnnxEncoder:
    """An encoder for `model_id` on `placement`: its ONNX export where there is one (`load`), else torch.

    Torch takes the weights from `checkpoint` when the model came from a file, else by
    architecture and tag (the bundled demo model included; downloaded once where missing, unless
    `offline`), and checks that they are `model_id`'s.
    """

    def load_torch() -> Encoder:
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise ModelError(
                f"the weights of the index's model ({model_id}) were at {checkpoint}, which does not exist "
                "any more: put the file back, or say where it is now (--checkpoint)"
            )
        hub.prepare(model_id.architecture, model_id.pretrained, checkpoint, offline=offline)  # before torch
        from indexer.models.encoder import load_encoder  # torch: only where a model is needed

        encoder = load_encoder(model_id.architecture, model_id.pretrained, checkpoint, device="cpu", offline=offline)
        if encoder.model_id == model_id:
            return encoder
        if model_id.architecture == DEMO_MODEL and checkpoint is None:  # new bundled weights since
            raise ModelMismatchError(
                f"the index was made with earlier weights of the bundled demo model ({model_id}); this "
                f"clipseek has {encoder.model_id}: index its pictures again, into a new index"
            )
        raise ModelMismatchError(f"the weights found are of {encoder.model_id}, not of the index's model {model_id}")

    return load(model_id, load_torch, placement=placement)


# -- models that cannot be exported -------------------------------------------------------


def _refusal_file(folder: Path) -> Path:
    return folder.with_name(folder.name + ".not-exportable.json")


# What the exporter can export: raised whenever it learns a new kind of model (Hugging Face
# tokenizers, for SigLIP and SigLIP 2), so that models it refused before are tried again.
EXPORTER_REVISION = 2


def _versions() -> dict[str, str | int]:
    return {name: metadata.version(name) for name in ("torch", "open_clip_torch")} | {"exporter": EXPORTER_REVISION}


def _refusal(folder: Path) -> str | None:
    """Why this model could not be exported, if that was tried with the torch and open_clip installed now."""
    try:
        record = json.loads(_refusal_file(folder).read_text(encoding="utf-8"))
        return record["reason"] if record["versions"] == _versions() else None
    except (OSError, ValueError, KeyError, TypeError, metadata.PackageNotFoundError):
        return None


def _refuse(folder: Path, reason: str) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    _refusal_file(folder).write_text(json.dumps({"reason": reason, "versions": _versions()}), encoding="utf-8")
