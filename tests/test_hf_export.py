"""A model whose tokenizer is Hugging Face's exports to ONNX and embeds without torch, with the
tokenizer's files copied beside its towers: SigLIP-shaped models (open_clip's own text tower,
bidirectional, pooled at its last position) and the real SigLIP and SigLIP 2 architectures, at
random weights, with SigLIP's T5 and SigLIP 2's Gemma tokenizers built locally."""

import json
from importlib import metadata

import numpy as np
import open_clip
import pytest
import torch
from open_clip.tokenizer import HFTokenizer

from indexer.models import backend
from indexer.models.encoder import Encoder
from indexer.models.hf_tokenizer import HfTokenizer
from indexer.models.identity import ModelId
from indexer.models.onnx_encoder import OnnxEncoder
from indexer.models.onnx_export import export
from tests.export_equality import assert_embeds_like_torch
from tests.hf_tokenizer_files import TEXTS, siglip2_gemma, siglip_t5

CONTEXT_LENGTH, DIM, SIDE = 64, 32, 32


def _register_tiny_siglip(tmp_path, name: str, tokenizer_folder) -> str:
    """A SigLIP-shaped open_clip config small enough to export in seconds."""
    vocab_size = HfTokenizer(tokenizer_folder).tokenizer.get_vocab_size()
    text = {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "width": 64, "heads": 2, "layers": 2}
    text |= {"no_causal_mask": True, "proj_bias": True, "pool_type": "last", "act_kwargs": {"approximate": "tanh"}}
    vision = {"image_size": SIDE, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}
    config = {"embed_dim": DIM, "init_logit_bias": -10, "custom_text": True, "vision_cfg": vision, "text_cfg": text}
    (tmp_path / f"{name}.json").write_text(json.dumps(config), encoding="utf-8")
    open_clip.add_model_config(tmp_path / f"{name}.json")
    return name


def _encoder(name: str, tokenizer_folder, layers: int | None = None) -> Encoder:
    """The model at random weights, with SigLIP's preprocessing and open_clip's HFTokenizer on the
    local files; `layers`: keep only the first of each tower's transformer blocks."""
    config = open_clip.get_model_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, image_resize_mode="squash"
        )
    if layers is not None:
        model.visual.trunk.blocks = model.visual.trunk.blocks[:layers]
        model.text.transformer.resblocks = model.text.transformer.resblocks[:layers]
    context_length = config["text_cfg"]["context_length"]
    tokenizer = HFTokenizer(str(tokenizer_folder), context_length=context_length, clean="canonicalize")
    model_id = ModelId(name, "random", None, config["embed_dim"], config["vision_cfg"]["image_size"])
    return Encoder(model.eval(), tokenizer, preprocess, model_id, "cpu")


def _export_embeds_like_torch(encoder: Encoder, folder) -> None:
    export(encoder, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["text"]["tokenizer"] == "hf" and (folder / "tokenizer" / "tokenizer.json").is_file()
    assert not manifest["text"]["trim"], "a bidirectional tower pooled at its last position sees all of its padding"

    onnx = OnnxEncoder(folder, encoder.model_id, int8="none")
    np.testing.assert_array_equal(onnx.tokenizer(TEXTS), encoder.tokenizer(TEXTS).numpy())
    assert_embeds_like_torch(onnx, encoder, TEXTS)


@pytest.mark.parametrize("family", [siglip_t5, siglip2_gemma], ids=["SigLIP", "SigLIP 2"])
def test_the_export_embeds_like_torch_with_the_tokenizer_beside_its_towers(family, tmp_path):
    name = _register_tiny_siglip(tmp_path, f"tiny-{family.__name__.replace('_', '-')}", family(tmp_path / "tokenizer"))
    _export_embeds_like_torch(_encoder(name, tmp_path / "tokenizer"), tmp_path / "export")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "family"), [("ViT-B-16-SigLIP", siglip_t5), ("ViT-B-16-SigLIP2", siglip2_gemma)])
def test_the_real_architectures_export_at_random_weights(name, family, tmp_path):
    """The real towers (timm's vision transformer with attention pooling, open_clip's text tower
    with SigLIP 2's 256,000-token embedding) at their published widths, two of each tower's
    twelve blocks: each block is the same code, so depth adds export time, not paths."""
    encoder = _encoder(name, family(tmp_path / "tokenizer"), layers=2)
    assert (
        encoder.model.text.token_embedding.num_embeddings == open_clip.get_model_config(name)["text_cfg"]["vocab_size"]
    )
    _export_embeds_like_torch(encoder, tmp_path / "export")


def test_a_model_refused_by_an_exporter_without_hugging_face_tokenizers_is_tried_again():
    model_id = ModelId("ViT-B-16-SigLIP", "webli", None, 768, 224)
    refusal = backend.export_dir(model_id).with_name(backend.export_dir(model_id).name + ".not-exportable.json")
    refusal.parent.mkdir(parents=True, exist_ok=True)
    versions = {name: metadata.version(name) for name in ("torch", "open_clip_torch")}
    reason = "ViT-B-16-SigLIP uses a tokenizer not ported to the ONNX path"
    refusal.write_text(json.dumps({"reason": reason, "versions": versions}), encoding="utf-8")
    assert backend.exported(model_id) is None, "not tried yet by this exporter"
    versions["exporter"] = backend.EXPORTER_REVISION
    refusal.write_text(json.dumps({"reason": reason, "versions": versions}), encoding="utf-8")
    assert backend.exported(model_id) is False
    refusal.unlink()
