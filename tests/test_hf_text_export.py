"""Hugging Face text towers (XLM-RoBERTa's, NLLB's encoder: open_clip's multilingual models)
export to ONNX and embed without torch: their attention mask and pooling over it, NLLB's
language code, queries trimmed to their real tokens because that is exact for them. The real
classes at random weights, tokenizers built locally (tests/hf_text_towers.py); the base models'
text towers at their published widths are in the slow tests."""

import json
import shutil

import numpy as np
import pytest
from onnx import load_model

from indexer.models.encoder import Encoder, load_encoder
from indexer.models.onnx_encoder import ExportBrokenError, OnnxEncoder
from indexer.models.onnx_export import export
from tests.export_equality import assert_embeds_like_torch
from tests.hf_text_towers import TOWERS, register
from tests.hf_tokenizer_files import TEXTS

QUERIES = ["一只晒太阳的猫", "a cat sunbathing", "猫", "햇볕을 쬐는 고양이", "🐱☀️", "قطة نائمة"]


def _exported(folder, architecture: str, sizes: str) -> tuple[Encoder, OnnxEncoder]:
    folder.mkdir()
    encoder = load_encoder(register(folder, architecture, sizes), "random")
    export(encoder, folder / "export")
    return encoder, OnnxEncoder(folder / "export", encoder.model_id, int8="none")


@pytest.fixture(scope="module", params=sorted(TOWERS))
def exported(request, tmp_path_factory):
    return _exported(tmp_path_factory.mktemp("hf-text") / "model", request.param, "tiny")


def _embeds_like_torch(encoder: Encoder, onnx: OnnxEncoder) -> None:
    text = onnx.manifest["text"]
    assert (text["tokenizer"], text["trim"], text["pool"]) == ("hf", True, "mask")
    assert onnx.logit_bias == encoder.logit_bias, "the score scale is recorded with the export"
    np.testing.assert_array_equal(onnx.tokenizer(TEXTS), encoder.tokenizer(TEXTS).numpy())
    if onnx.tokenizer.family == "NllbTokenizer":  # open_clip tokenises in the config's language: English
        assert (onnx.tokenizer(QUERIES)[:, 0] == onnx.tokenizer.tokenizer.token_to_id("eng_Latn")).all()
    assert_embeds_like_torch(onnx, encoder, TEXTS + QUERIES)


def test_the_export_embeds_like_torch(exported):
    _embeds_like_torch(*exported)


def test_trimmed_queries_give_the_vectors_of_padded_ones(exported):
    encoder, onnx = exported
    assert encoder.trims_text and onnx.trims_text
    tokens = onnx.tokenizer(QUERIES)
    assert onnx._cut(tokens).shape[1] < tokens.shape[1] / 3, "short queries run on a fraction of the context"
    for model in (encoder, onnx):
        trimmed, padded = model.embed_texts(QUERIES), model.embed_texts(QUERIES, trim=False)
        np.testing.assert_allclose(trimmed, padded, rtol=0, atol=1e-6)
    one_at_a_time = np.concatenate([onnx.embed_texts([query]) for query in QUERIES])
    np.testing.assert_allclose(one_at_a_time, onnx.embed_texts(QUERIES), rtol=0, atol=1e-6)


def test_padding_on_the_left_is_not_trimmed(exported):
    """Cutting the end of a row padded on the left would cut its text: such a tower runs the full context."""
    encoder, _ = exported
    hf = encoder.tokenizer.tokenizer
    hf.padding_side = "left"
    try:
        assert not Encoder(encoder.model, encoder.tokenizer, encoder.preprocess, encoder.model_id, "cpu").trims_text
    finally:
        hf.padding_side = "right"


def _flip_a_byte(path) -> None:
    weights = bytearray(path.read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    path.write_bytes(bytes(weights))


def test_a_damaged_text_tower_is_an_error_not_a_wrong_vector(exported, tmp_path):
    _, onnx = exported
    copy = shutil.copytree(onnx.folder, tmp_path / "export")
    _flip_a_byte(copy / "text.onnx.data")
    with pytest.raises(ExportBrokenError, match=r"text\.onnx\.data .* is damaged \(checksum\)"):
        OnnxEncoder(copy, onnx.model_id, int8="none").embed_texts(["猫"])


def _nodes(graph) -> int:
    return len(load_model(graph, load_external_data=False).graph.node)


def test_queries_take_the_int8_text_tower_as_optimised_at_export(exported, tmp_path):
    """On the CPU a query's int8 text tower is the graph ONNX Runtime's optimisations made of it
    at export (fewer nodes: fused), loaded with them off: the plain int8 tower's vectors (CUDA's
    provider loads that one), its weights checked like every tower's."""
    _, onnx = exported
    optimized = onnx.manifest["text_int8"]["optimized"]
    assert set(optimized["files"]) == {"text.int8.opt.onnx", "text.int8.opt.onnx.data"}
    assert _nodes(onnx.folder / "text.int8.opt.onnx") < _nodes(onnx.folder / "text.int8.onnx")
    plain = shutil.copytree(onnx.folder, tmp_path / "plain")
    manifest = json.loads((plain / "manifest.json").read_text())
    del manifest["text_int8"]["optimized"]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    texts = QUERIES + TEXTS
    queried = OnnxEncoder(onnx.folder, onnx.model_id, int8="all").embed_texts(texts)
    np.testing.assert_allclose(queried, OnnxEncoder(plain, onnx.model_id, int8="all").embed_texts(texts), atol=1e-6)
    damaged = shutil.copytree(onnx.folder, tmp_path / "damaged")
    _flip_a_byte(damaged / "text.int8.opt.onnx.data")
    with pytest.raises(ExportBrokenError, match=r"text\.int8\.opt\.onnx\.data .* is damaged \(checksum\)"):
        OnnxEncoder(damaged, onnx.model_id, int8="all").embed_texts(["猫"])


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(TOWERS))
def test_the_base_text_towers_export_at_their_published_widths(architecture, tmp_path):
    """xlm-roberta-base's layers of 768 and NLLB-200-distilled-600M's encoder's of 1,024, two of
    each tower's twelve, their vocabularies the tokenizer's built here (tests/hf_text_towers.py)."""
    encoder, onnx = _exported(tmp_path / "model", architecture, "text")
    width = encoder.model.text.config.hidden_size
    assert width == {"xlm-roberta-base-ViT-B-32": 768, "nllb-clip-base-siglip": 1024}[architecture]
    _embeds_like_torch(encoder, onnx)
