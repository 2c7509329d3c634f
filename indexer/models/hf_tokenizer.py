"""A Hugging Face tokenizer without torch or transformers: the same token ids as open_clip's HFTokenizer.

    tokenizer = HfTokenizer(folder, context_length=64, clean="canonicalize")
    tokenizer(["一只晒太阳的猫"])   # (1, 64) int64: the pieces, the family's special tokens, padding

`folder` holds the model's `tokenizer.json` (run by the `tokenizers` library, in Rust) and, where
the model has them, `tokenizer_config.json` and `special_tokens_map.json`, which name the pad and
separator tokens. Around the file this applies what open_clip's HFTokenizer and transformers do:
open_clip's cleaning; truncation to the context length (the special tokens kept) and padding to
it, on the sides transformers uses (the config's, else the family's); `strip_sep_token` (CLIPA
zeroes BERT's [SEP]); and NLLB's language code, which transformers puts in front of each text
whatever the file's template says: the config's `src_lang`, else English. `language` (or
`set_language`) chooses another, as transformers' `src_lang` does; open_clip's own `language`
argument is lost, because transformers restores `src_lang` before every call.
tests/test_hf_tokenizer.py holds it to open_clip's HFTokenizer on files in each family's format.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, processors

from indexer.errors import ModelError
from indexer.models.tokenizer import CLEANERS

__all__ = ["HfTokenizer"]

# transformers' NllbTokenizer starts in English when the config names no source language
NLLB_DEFAULT_LANGUAGE = "eng_Latn"
# transformers' classes that pad on the left where the config does not say (the others pad on the right)
LEFT_PADDING = frozenset(
    {"GemmaTokenizer", "LlamaTokenizer", "CodeLlamaTokenizer", "CohereTokenizer", "Siglip2Tokenizer", "XLNetTokenizer"}
)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token(value: str | dict | None) -> str | None:
    # configs write a special token as its text or as an AddedToken's fields
    return value.get("content") if isinstance(value, dict) else value


class HfTokenizer:
    def __init__(
        self,
        folder: str | Path,
        context_length: int = 77,
        clean: str = "whitespace",
        strip_sep_token: bool = False,
        language: str | None = None,
    ):
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ModelError(f"{folder} has no tokenizer.json: the model's download or export puts it there")
        self.folder = folder  # an export copies its files
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # transformers lets tokenizer_config.json override special_tokens_map.json
        self.config = _read_json(folder / "special_tokens_map.json") | _read_json(folder / "tokenizer_config.json")
        self.family = str(self.config.get("tokenizer_class") or "").removesuffix("Fast")
        self.context_length = context_length
        self.clean, self.clean_name = CLEANERS[clean], clean
        self.pad_id = self._id("pad_token", ("<pad>", "[PAD]"))
        self.sep_id = self._id("sep_token", ("[SEP]", "</s>")) if strip_sep_token else None
        if self.family == "NllbTokenizer" or language is not None:  # another family refuses a language
            self.set_language(language or self.config.get("src_lang") or NLLB_DEFAULT_LANGUAGE)
        # The file's own padding and truncation are replaced: open_clip asks for exactly the context
        # length, on the sides the config (or transformers' class for the family) names.
        padding_side = self.config.get("padding_side") or ("left" if self.family in LEFT_PADDING else "right")
        cut_side = self.config.get("truncation_side") or "right"
        self.tokenizer.enable_truncation(max_length=context_length, direction=cut_side)
        self.tokenizer.enable_padding(
            direction=padding_side,
            length=context_length,
            pad_id=self.pad_id,
            pad_token=self.tokenizer.id_to_token(self.pad_id),
        )

    def _id(self, name: str, fallbacks: tuple[str, ...]) -> int:
        """The id of a named special token: the config's, else the first fallback the vocabulary has."""
        named = _token(self.config.get(name))
        for token in [named] if named else fallbacks:
            number = self.tokenizer.token_to_id(token)
            if number is not None:
                return number
        raise ModelError(f"the tokenizer has no {name} ({named or ' or '.join(fallbacks)})")

    def set_language(self, language: str) -> None:
        """NLLB's source language: its code opens each text (or follows the end token, in the legacy order)."""
        if self.family != "NllbTokenizer":
            raise ModelError(f"a {self.family or 'tokenizer'} has no language codes (only NLLB's have)")
        if self.tokenizer.token_to_id(language) is None:
            raise ModelError(f"the tokenizer knows no language code {language!r}")
        eos = _token(self.config.get("eos_token")) or "</s>"
        legacy = self.config.get("legacy_behaviour", False)
        self.tokenizer.post_processor = processors.TemplateProcessing(
            single=["$A", eos, language] if legacy else [language, "$A", eos],
            special_tokens=[(token, self.tokenizer.token_to_id(token)) for token in (language, eos)],
        )

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts), context_length) int64 ids; a text too long is cut and keeps its special tokens."""
        encodings = self.tokenizer.encode_batch([self.clean(text) for text in texts])
        ids = np.array([encoding.ids for encoding in encodings], np.int64).reshape(len(texts), self.context_length)
        if self.sep_id is not None:
            ids[ids == self.sep_id] = 0
        return ids
