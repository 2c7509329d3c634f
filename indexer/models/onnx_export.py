"""Export a loaded model's two towers to ONNX, for the query path without torch (indexer/onnx_encoder.py).

    export(load_encoder("ViT-B-32"), folder)   # about 20 s for ViT-B-32, once per model

The text tower is exported on token sequences of any length, so queries embed only their real
tokens, as the torch path does (where the tower allows it: see Encoder.text_pooling). Before the
export is put in place, ONNX Runtime must reproduce torch's vectors for a probe text and a
probe picture, and the torch-free tokenizer open_clip's token ids for the probe texts. The
tokenizer's files go beside the towers: CLIP's merges, or a Hugging Face tokenizer's
tokenizer.json and config (SigLIP, SigLIP 2, the multilingual models, whose Hugging Face text
towers are exported with the attention mask they derive from the padding). A model that cannot
be exported (a tokenizer not ported, another kind of preprocessing, an operator the exporter
lacks) raises NotExportableError with the reason, and keeps the torch path.

Besides indexer/encoder.py, this is the one module that imports torch and open_clip.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip import tokenizer as clip_tokenizer
from torch.export import Dim

from indexer.errors import ModelError
from indexer.models.encoder import Encoder, special_id, text_forward
from indexer.models.hf_tokenizer import HfTokenizer
from indexer.models.identity import ModelId
from indexer.models.onnx_encoder import (
    FORMAT,
    INT8_PROBE_TEXTS,
    MANIFEST,
    PROBE_TEXT,
    ExportBrokenError,
    OnnxEncoder,
    file_checksum,
    probe_picture,
)
from indexer.models.pixels import Preprocess
from indexer.models.tokenizer import read_merges

__all__ = ["NotExportableError", "export"]

VOCAB = "merges.txt"  # the merges CLIP uses, unzipped: 0.4 MB that a fresh process reads in milliseconds
HF_TOKENIZER = "tokenizer"  # the folder of a Hugging Face tokenizer's files
CLEANERS = {  # open_clip's cleaning functions by the names its configs (and indexer.models.tokenizer) use
    clip_tokenizer._clean_lower: "lower",
    clip_tokenizer._clean_whitespace: "whitespace",
    clip_tokenizer._clean_canonicalize: "canonicalize",
}


class NotExportableError(ModelError):
    """This model cannot take the ONNX path; the message says why. Torch embeds for it."""


class _Text(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, pooling: tuple[torch.nn.Module, str] | None):
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pooling is None:
            return self.model.encode_text(tokens, normalize=True)
        return text_forward(*self.pooling, tokens)


class _Image(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True)


def export(encoder: Encoder, folder: str | os.PathLike) -> None:
    """Write the export of `encoder`'s model to `folder` (replacing one there), checked before it is put there."""
    folder = Path(folder)
    text, image = _text_settings(encoder), _image_settings(encoder)
    work = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _write_tokenizer(encoder, text, work)
        example = encoder.tokenizer([PROBE_TEXT, "a dog"])
        length = Dim("length", min=2, max=text["context_length"]) if text["trim"] else None
        text["files"] = _export(_Text(encoder.model, encoder.text_pooling), example, length, work / "text.onnx")
        side = encoder.model_id.image_size
        example = torch.zeros(2, 3, *((side, side) if isinstance(side, int) else side))
        image["files"] = _export(_Image(encoder.model), example, None, work / "image.onnx")
        text["probe"] = encoder.embed_texts([PROBE_TEXT])[0].tolist()
        pixels = torch.from_numpy(Preprocess.from_dict(image["preprocess"])(probe_picture()))
        image["probe"] = encoder.embed_preprocessed([pixels])[0].tolist()
        manifest = {
            "format": FORMAT,
            "model": encoder.model_id.to_dict(),
            "logit_scale": encoder.logit_scale,
            "logit_bias": encoder.logit_bias,
            "text": text,
            "image": image,
            "exported_with": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        _check(work, encoder)
        _quantize(work, manifest)
        _put_in_place(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _text_settings(encoder: Encoder) -> dict:
    tokenizer = encoder.tokenizer
    if isinstance(tokenizer, HfTokenizer):  # the demo model's, read without transformers
        settings = {"tokenizer": "hf", "vocab": HF_TOKENIZER, "strip_sep_token": tokenizer.sep_id is not None}
        clean = tokenizer.clean_name
    elif isinstance(tokenizer, clip_tokenizer.HFTokenizer) and not tokenizer.tokenizer_mode:
        settings = {"tokenizer": "hf", "vocab": HF_TOKENIZER, "strip_sep_token": tokenizer.strip_sep_token}
    elif isinstance(tokenizer, clip_tokenizer.SimpleTokenizer) and tokenizer.reduction_fn is None:
        special = [tokenizer.decoder[i] for i in tokenizer.all_special_ids]
        settings = {"tokenizer": "clip", "vocab": VOCAB, "special_tokens": special}
    else:
        raise NotExportableError(f"{encoder.model_id.architecture} uses a tokenizer not ported to the ONNX path")
    if not isinstance(tokenizer, HfTokenizer):
        if tokenizer.clean_fn not in CLEANERS:
            raise NotExportableError(f"{encoder.model_id.architecture} cleans its texts in a way that is not ported")
        clean = CLEANERS[tokenizer.clean_fn]
    pooling = encoder.text_pooling
    return {
        "model": "text.onnx",
        **settings,
        "context_length": tokenizer.context_length,
        "clean": clean,
        "trim": pooling is not None,
        "pool": pooling[1] if pooling else "argmax",
        "eos_id": special_id(*pooling) if pooling and pooling[1] == "eos" else None,
        "pad_id": special_id(*pooling) if pooling and pooling[1] == "mask" else None,
    }


def _write_tokenizer(encoder: Encoder, text: dict, work: Path) -> None:
    """The tokenizer's files beside the towers: CLIP's merges, or the Hugging Face tokenizer as
    open_clip holds it (its tokenizer.json and the config naming its special tokens)."""
    if isinstance(encoder.tokenizer, HfTokenizer):
        (work / HF_TOKENIZER).mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (encoder.tokenizer.folder / name).is_file():
                shutil.copyfile(encoder.tokenizer.folder / name, work / HF_TOKENIZER / name)
    elif text["tokenizer"] == "hf":
        encoder.tokenizer.save_pretrained(str(work / HF_TOKENIZER))
    else:
        merges = read_merges(clip_tokenizer.default_bpe())
        (work / VOCAB).write_text("\n".join(["#version: 0.2", *merges, ""]), encoding="utf-8")


def _image_settings(encoder: Encoder) -> dict:
    try:
        preprocess = Preprocess.from_open_clip(encoder.model.visual.preprocess_cfg)
    except ValueError as error:
        raise NotExportableError(f"{encoder.model_id.architecture}: {error}") from None
    picture = probe_picture().resize((301, 257))
    if not np.allclose(preprocess(picture), encoder.preprocess(picture).numpy(), atol=1e-5):
        raise NotExportableError(f"{encoder.model_id.architecture} preprocesses pictures in a way that is not ported")
    return {"model": "image.onnx", "preprocess": preprocess.to_dict()}


def _export(module: torch.nn.Module, example: torch.Tensor, length: Dim | None, path: Path) -> dict[str, tuple]:
    """Export one tower (batch size free, and sequence length where `length` is given): its files, sizes, checksums."""
    shapes = {0: Dim("batch")} | ({1: length} if length is not None else {})
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                module.eval(), (example,), str(path), dynamo=True, external_data=True,
                input_names=["input"], output_names=["vectors"], dynamic_shapes=(shapes,),
            )  # fmt: skip
    except Exception as error:  # the exporter fails in many ways on operators it lacks
        message = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise NotExportableError(f"the ONNX exporter failed on {path.stem} tower: {message}") from error
    return _files(path)


@contextlib.contextmanager
def _quiet():
    """The exporter and the quantiser print progress, warnings and advice meant for their developers."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _check(work: Path, encoder: Encoder) -> None:
    """The export must reproduce torch through ONNX Runtime, with our tokenizer and preprocessing."""
    exported = OnnxEncoder(work, encoder.model_id, int8="none")
    texts = list(INT8_PROBE_TEXTS)
    if not np.array_equal(exported.tokenizer(texts), encoder.tokenizer(texts).numpy()):
        raise NotExportableError(f"{encoder.model_id.architecture}'s tokenizer is not reproduced without torch")
    try:
        exported.embed_texts([PROBE_TEXT])
        exported.embed_images([probe_picture()])
    except ExportBrokenError as error:
        raise NotExportableError(f"the ONNX export does not reproduce the model: {error}") from None


def _quantize(work: Path, manifest: dict) -> None:
    """Add the int8 towers: weights of matrix products quantised to 8 bits (one scale per output
    channel), activations quantised on the fly (ONNX Runtime's dynamic quantisation). Their
    probes are their own; the text tower's cosine to float32 over INT8_PROBE_TEXTS decides
    whether queries use it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for tower in ("text", "image"):
        quantized = work / f"{tower}.int8.onnx"
        # The weights in a file of their own beside the graph: ONNX Runtime reads them three times
        # as fast as weights inside the graph's protobuf (xlm-roberta-base's 280 MB text tower
        # opens in 0.5 s instead of 1.4 s), which a cold query waits for.
        with _quiet():
            quantize_dynamic(
                work / f"{tower}.onnx", quantized, weight_type=QuantType.QInt8, per_channel=True,
                use_external_data_format=True,
            )  # fmt: skip
        manifest[f"{tower}_int8"] = {"model": quantized.name, "files": _files(quantized), "probe": None, "cosine": 0.0}
    manifest["text_int8"]["optimized"] = _optimized(work / "text.int8.onnx", work / "text.int8.opt.onnx")
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    model_id = ModelId.from_dict(manifest["model"])
    for tower, probe in OnnxEncoder(work, model_id, int8="all").measured_probes().items():
        manifest[f"{tower}_int8"]["probe"] = probe
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    texts = list(INT8_PROBE_TEXTS)
    float32, int8 = (OnnxEncoder(work, model_id, int8=towers).embed_texts(texts) for towers in ("none", "all"))
    manifest["text_int8"]["cosine"] = round(float((float32 * int8).sum(axis=1).min()), 6)
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def _files(graph: Path) -> dict[str, tuple[int, int]]:
    """A graph's file and its weights' file beside it: their sizes and checksums."""
    parts = sorted(graph.parent.glob(f"{graph.name}*"))
    return {file.name: (file.stat().st_size, file_checksum(file)) for file in parts}


def _optimized(source: Path, target: Path) -> dict:
    """`source` as ONNX Runtime's graph optimisations leave it (attention, layer norms and the
    quantised products fused), saved as `target` with its weights beside it, for the int8 text
    tower that embeds every query: loaded with the optimisations off (OnnxEncoder), it gives
    the same vectors and its session is made in two thirds of the time (xlm-roberta-base: 0.10
    s of CPU instead of 0.14). The extended level, not all: the layout changes of "all" are for
    the machine that makes them. Kept beside the plain int8 tower, which CUDA's provider loads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{target.name}.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return {"model": target.name, "files": _files(target)}


def _put_in_place(work: Path, folder: Path) -> None:
    old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
    if folder.exists():
        folder.rename(old)
    work.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
