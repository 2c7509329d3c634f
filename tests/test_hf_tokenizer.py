"""The torch-free Hugging Face tokenizer gives exactly open_clip's HFTokenizer's token ids.

No model hub is reachable, so each family's tokenizer files are built here with the `tokenizers`
library in the shape of the real ones (the pipeline transformers' class for that family builds),
trained on a little multilingual text, and read both by open_clip (through transformers) and by
HfTokenizer.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from open_clip.tokenizer import HFTokenizer  # reads the files with transformers (the hf extra)
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from indexer.errors import ModelError
from indexer.models.hf_tokenizer import HfTokenizer

CORPUS = [
    "a cat sunbathing on a windowsill",
    "two dogs running on the beach at sunset",
    "A red circle on the left over a grass background",
    "一只猫在窗台上晒太阳，眯着眼睛，看起来很舒服。",
    "海边的日落，两只狗在沙滩上奔跑。",
    "左边有一个红色的圆，背景是草地。",
    "窓辺で日向ぼっこをする猫",
    "夕焼けの海辺を走る二匹の犬",
    "창가에서 햇볕을 쬐는 고양이",
    "해질녘 해변을 달리는 두 마리의 개",
    "قطة تستلقي في الشمس على حافة النافذة",
    "كلبان يركضان على الشاطئ عند الغروب",
    "un chat qui prend le soleil sur le rebord de la fenêtre",
    "кошка греется на солнце на подоконнике",
    "le café, la crème brûlée et le smörgåsbord",
]

TEXTS = [
    "",
    "   ",
    "一只晒太阳的猫",
    "在这个宁静的午后，阳光透过窗户洒在木地板上，一只橘色的猫蜷缩成一团，尾巴轻轻摆动，仿佛在做一个甜美的梦。",
    "窓辺で日向ぼっこをしている猫の写真",
    "햇볕을 쬐는 고양이 사진",
    "صورة قطة تستمتع بأشعة الشمس",
    "emoji 🐱🐶👍🏽🧑‍🚀 flags 🇫🇷 and 🌸",
    "a cat 猫 고양이 قطة кошка 🐈 in one query",
    "A CAT Sunbathing!!! it's the dog's toy, isn't it?",
    "&amp;lt;b&amp;gt; &quot;quoted&quot; tabs\tand\nnewlines\r\n  and   spaces",
    "e\u0301 combining accent, full-width ＡＢＣ, zero\u200bwidth\u00a0space",
    "<s> </s> <pad> <unk> [SEP] [CLS] <eos> <bos> eng_Latn inside a text",
    "photo " + "very " * 100 + "long caption",
    "猫" * 300,
    "a " * 200,
]


def _save(tokenizer: Tokenizer, folder: Path, config: dict) -> Path:
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _unigram(specials: list[str]) -> Tokenizer:
    """A SentencePiece-style unigram model (XLM-RoBERTa's, T5's): whitespace split, then ▁ before each word."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>")
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def xlm_roberta(folder: Path) -> Path:
    """xlm-roberta-base's layout: <s> <pad> </s> <unk> first, <mask> last, `<s> text </s>`."""
    tokenizer = _unigram(["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer.add_special_tokens(["<mask>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    names = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>"}
    return _save(
        tokenizer,
        folder,
        {"tokenizer_class": "XLMRobertaTokenizer", **names, "pad_token": "<pad>", "mask_token": "<mask>"},
    )


def xlm_roberta_as_on_the_hub(folder: Path) -> Path:
    """xlm-roberta-base and -large ship no tokenizer_config.json: the model's config.json names the
    family, and the special tokens are the family's defaults."""
    xlm_roberta(folder)
    (folder / "tokenizer_config.json").unlink()
    (folder / "config.json").write_text(json.dumps({"model_type": "xlm-roberta"}), encoding="utf-8")
    return folder


def siglip_t5(folder: Path) -> Path:
    """SigLIP's T5 SentencePiece vocabulary as open_clip saved it: `text </s>`, padded with </s> (id 1)."""
    tokenizer = _unigram(["<pad>", "</s>", "<unk>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    return _save(tokenizer, folder, {**config, "extra_ids": 0, "additional_special_tokens": []})


def siglip2_gemma(folder: Path) -> Path:
    """Gemma's byte-fallback BPE, as SigLIP 2 uses it: spaces become ▁, unknown characters their
    UTF-8 bytes (<0x..> pieces), no <bos>, <eos> added by the config's flags, padded with <pad>."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials))
    learned = json.loads(trained.to_str())["model"]
    pieces = [*specials, *(f"<0x{byte:02X}>" for byte in range(256))]
    pieces += [piece for piece in sorted(learned["vocab"], key=learned["vocab"].get) if piece not in specials]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in learned["merges"]]
    vocab = {piece: number for number, piece in enumerate(pieces)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.add_special_tokens(specials)
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    names = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {"tokenizer_class": "GemmaTokenizer", **names, "add_bos_token": False, "add_eos_token": True}
    return _save(tokenizer, folder, {**config, "padding_side": "right"})


LANGUAGES = ["eng_Latn", "zho_Hans", "jpn_Jpan", "kor_Hang", "arb_Arab", "fra_Latn"]


def nllb(folder: Path) -> Path:
    """NLLB-200's SentencePiece BPE with its language codes after the vocabulary; the file's own
    template is replaced by the language's (`zho_Hans text </s>`)."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(Regex(r" {2,}"), " ")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials))
    tokenizer.add_special_tokens([*LANGUAGES, "<mask>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="eng_Latn $A </s>", special_tokens=[("eng_Latn", tokenizer.token_to_id("eng_Latn")), ("</s>", 2)]
    )
    names = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "NllbTokenizer", **names, "pad_token": "<pad>", "mask_token": "<mask>"}
    return _save(
        tokenizer,
        folder,
        {**config, "src_lang": None, "legacy_behaviour": False, "additional_special_tokens": LANGUAGES},
    )


def bert(folder: Path) -> Path:
    """bert-base-uncased's WordPiece (CLIPA's text tower): lower-cased, `[CLS] text [SEP]`."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    names = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]"}
    return _save(tokenizer, folder, {"tokenizer_class": "BertTokenizer", "do_lower_case": True, **names})


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
