"""Tokenizer files in the format of each Hugging Face family open_clip uses, built with the
`tokenizers` library (no hub is reachable): the pipeline transformers' class for that family
builds, trained on a little multilingual text, with the config files the hub's copies have.
"""

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

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

# what each family is compared on: the scripts of the languages, emoji, mixed and over-long texts
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
