"""The torch-free Hugging Face tokenizer gives exactly open_clip's HFTokenizer's token ids.

No model hub is reachable, so each family's tokenizer files are built locally in the shape of the
real ones (tests/hf_tokenizer_files.py), and read both by open_clip (through transformers) and by
HfTokenizer.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from open_clip.tokenizer import HFTokenizer  # reads the files with transformers (the hf extra)

from indexer.demo_world import ATTRIBUTES, Scene, caption
from indexer.errors import ModelError
from indexer.models.hf_tokenizer import HfTokenizer
from indexer.models.identity import demo_tokenizer
from tests.hf_tokenizer_files import (
    LANGUAGES,
    TEXTS,
    bert,
    nllb,
    siglip2_gemma,
    siglip_t5,
    xlm_roberta,
    xlm_roberta_as_on_the_hub,
)

# each family as open_clip's model configs use it: hf_tokenizer_name's format, context_length, tokenizer_kwargs
FAMILIES = {
    "xlm-roberta-base-ViT-B-32": (xlm_roberta, 77, {}),
    "xlm-roberta-large-ViT-H-14": (xlm_roberta_as_on_the_hub, 77, {}),
    "ViT-B-16-SigLIP-i18n-256": (siglip_t5, 64, {"clean": "canonicalize"}),
    "ViT-B-16-SigLIP2": (siglip2_gemma, 64, {"clean": "canonicalize"}),
    "nllb-clip-base-siglip": (nllb, 77, {}),
    "ViT-L-14-CLIPA": (bert, 32, {"strip_sep_token": True}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_token_ids_equal_open_clips(family, tmp_path):
    build, context_length, kwargs = FAMILIES[family]
    folder = build(tmp_path / family)
    expected = HFTokenizer(str(folder), context_length=context_length, **kwargs)(TEXTS).numpy()
    got = HfTokenizer(folder, context_length=context_length, **kwargs)(TEXTS)
    assert got.dtype == np.int64 and got.shape == expected.shape == (len(TEXTS), context_length)
    assert [text for text, a, b in zip(TEXTS, expected, got, strict=True) if not np.array_equal(a, b)] == []
    pad = HfTokenizer(folder, context_length=context_length, **kwargs).pad_id
    assert (got[:, -2] != pad).any(), "the texts must include some cut at the context length"


def test_the_demo_models_tokenizer_gives_open_clips_ids_and_reads_both_languages():
    scene = Scene(shape="circle", colour="red", size="large", position="left", background="grass")
    texts = [*TEXTS, caption(scene), caption(scene, language="zh"), "左边的大红圆", "草地上左边有个大红圆"]
    expected = HFTokenizer(str(demo_tokenizer()), context_length=32)(texts).numpy()
    tokenizer = HfTokenizer(demo_tokenizer(), context_length=32)
    assert np.array_equal(tokenizer(texts), expected)
    pieces = [tokenizer.tokenizer.id_to_token(int(i)) for i in tokenizer(texts[-1:])[0] if i != tokenizer.pad_id]
    assert pieces == ["[CLS]", *"草地上左边有个大红圆", "[SEP]"]  # each Chinese character a piece of its own
    words = [tokenizer.tokenizer.id_to_token(int(i)) for i in tokenizer([caption(scene, keep=ATTRIBUTES)])[0]]
    assert "[UNK]" not in words and {"large", "red", "circle", "left", "grass"} <= set(words)


@pytest.mark.parametrize(
    ("build", "sides", "padded"),
    [
        (siglip2_gemma, {"padding_side": None}, "left"),  # Gemma's class pads on the left unless told
        (xlm_roberta, {"padding_side": "left", "truncation_side": "left"}, "left"),
        (siglip_t5, {"truncation_side": "left"}, "right"),
    ],
    ids=["gemma-unset", "xlm-roberta-left", "t5-cut-on-the-left"],
)
def test_the_sides_padded_and_cut_are_open_clips(build, sides, padded, tmp_path):
    folder = build(tmp_path / "tokenizer")
    config = json.loads((folder / "tokenizer_config.json").read_text()) | sides
    config = {key: value for key, value in config.items() if value is not None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    expected = HFTokenizer(str(folder), context_length=24)(TEXTS).numpy()
    ours = HfTokenizer(folder, context_length=24)
    got = ours(TEXTS)
    np.testing.assert_array_equal(got, expected)
    (short,) = ours(["cat"])
    assert short[0 if padded == "left" else -1] == ours.pad_id


# open_clip's own `language` argument is lost: transformers restores the config's source language
# (`src_lang`) before every call. Its `src_lang` argument is what takes effect, and `language` here means that.
@pytest.mark.parametrize("language", [*LANGUAGES, None])
def test_nllb_language_codes_equal_open_clips(language, tmp_path):
    folder = nllb(tmp_path / "nllb")
    expected = HFTokenizer(str(folder), context_length=77, src_lang=language)(TEXTS).numpy()
    ours = HfTokenizer(folder, context_length=77, language=language)
    got = ours(TEXTS)
    np.testing.assert_array_equal(got, expected)
    code = ours.tokenizer.token_to_id(language or "eng_Latn")
    assert (got[:, 0] == code).all(), "each text opens with its language's code"


def test_nllb_in_the_legacy_order_ends_with_the_language_code(tmp_path):
    folder = nllb(tmp_path / "nllb")
    config = json.loads((folder / "tokenizer_config.json").read_text()) | {
        "legacy_behaviour": True,
        "src_lang": "zho_Hans",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    expected = HFTokenizer(str(folder), context_length=16)(TEXTS).numpy()
    got = HfTokenizer(folder, context_length=16)(TEXTS)
    np.testing.assert_array_equal(got, expected)
    (short,) = HfTokenizer(folder, context_length=16)(["猫"])
    pieces = [piece for piece in short if piece != 1]
    assert pieces[-2:] == [2, HfTokenizer(folder).tokenizer.token_to_id("zho_Hans")]


def test_set_language_changes_the_code_of_later_texts(tmp_path):
    ours = HfTokenizer(nllb(tmp_path / "nllb"), context_length=16)
    ours.set_language("kor_Hang")
    (ids,) = ours(["고양이"])
    assert ids[0] == ours.tokenizer.token_to_id("kor_Hang")


def test_a_language_is_refused_where_it_cannot_be_used(tmp_path):
    with pytest.raises(ModelError, match="no language codes"):
        HfTokenizer(xlm_roberta(tmp_path / "xlmr"), language="zho_Hans")
    with pytest.raises(ModelError, match="no language code 'xxx_Yyyy'"):
        HfTokenizer(nllb(tmp_path / "nllb"), language="xxx_Yyyy")


def test_a_folder_without_tokenizer_json_says_where_it_comes_from(tmp_path):
    with pytest.raises(ModelError, match=r"no tokenizer\.json: the model.s download or export puts it there"):
        HfTokenizer(tmp_path)


def test_unknown_characters_fall_back_to_their_bytes_in_gemmas_format(tmp_path):
    ours = HfTokenizer(siglip2_gemma(tmp_path / "gemma"), context_length=16)
    (ids,) = ours(["🦜"])
    pieces = [ours.tokenizer.id_to_token(number) for number in ids[:5]]
    assert pieces == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>", "<eos>"]


def test_importing_it_does_not_import_torch_or_transformers():
    code = "import sys, indexer.models.hf_tokenizer as m; print(*(n in sys.modules for n in ('torch', 'transformers')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
