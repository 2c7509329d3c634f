"""The torch-free tokenizer gives exactly open_clip's token ids, on texts chosen to break it."""

import random
import subprocess
import sys

import numpy as np
import pytest
from open_clip.tokenizer import SimpleTokenizer, default_bpe

from indexer.demo_world import VALUES
from indexer.models.tokenizer import ClipTokenizer

AWKWARD = [
    "",
    "   ",
    "a cat sunbathing",
    "A CAT Sunbathing!!!",
    "it's the dog's toy, isn't it? they'll've gone",
    "naïve café, crème brûlée and smörgåsbord",
    "東京の夜景と桜 🌸",
    "Привет, мир — Ελληνικά — עברית — العربية",
    "emoji 🐱🐶👍🏽🧑‍🚀 flags 🇫🇷",
    "&amp;lt;b&amp;gt; &quot;quoted&quot; &#39;html&#39; &lt;i&gt;",
    "mojibake: Ã©tÃ© â€œsmartâ€\x9d quotes",
    "tabs\tand\nnewlines\r\n  and   spaces",
    "numbers 1234567890 3.14159 1e-9 #42 @user",
    "e\u0301 combining accent, ligature ﬁ, full-width ＡＢＣ",
    "zero\u200bwidth and\u00a0non-breaking",
    "<start_of_text> inside <end_of_text> a text",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a " * 200,
    "photo " + "very " * 100 + "long caption",
    "\x00\x01 control \x7f characters",
    "______ under_scores and-dashes—em",
]


def _sample(count: int, seed: int) -> list[str]:
    """Texts mixing demo-world words, other scripts, punctuation and emoji, of every length."""
    rng = random.Random(seed)
    words = [value for values in VALUES.values() for value in values] + ["a", "the", "on", "of", "over", "photo"]
    pool = "aeiouxyzAÉçßøñ東京桜ж ё🙂🚀!?.,'’\"-_&;#0123456789\t\n"
    texts = []
    for _ in range(count):
        parts = [rng.choice(words) if rng.random() < 0.6 else "".join(rng.choices(pool, k=rng.randint(1, 12)))]
        parts += [rng.choice(words) for _ in range(rng.randint(0, 60))]
        texts.append(" ".join(parts))
    return texts


@pytest.mark.parametrize("clean", ["lower", "whitespace", "canonicalize"])
@pytest.mark.parametrize("context_length", [77, 32])
def test_token_ids_equal_open_clips(clean, context_length):
    theirs = SimpleTokenizer(context_length=context_length, clean=clean)
    ours = ClipTokenizer(default_bpe(), context_length=context_length, clean=clean)
    texts = AWKWARD + _sample(1500, seed=context_length)
    expected = theirs(texts).numpy()
    got = ours(texts)
    mismatched = [text for text, a, b in zip(texts, expected, got, strict=True) if not np.array_equal(a, b)]
    assert got.dtype == np.int64 and got.shape == expected.shape
    assert mismatched == []
    assert (got[:, -1] != 0).any(), "the sample must include texts cut at the context length"


def test_an_over_long_text_is_cut_and_still_ends_with_the_end_token():
    ours = ClipTokenizer(default_bpe(), context_length=8)
    (ids,) = ours(["one two three four five six seven eight nine"])
    assert ids[0] == ours.start and ids[-1] == ours.end and (ids != 0).all()


def test_importing_it_does_not_import_torch():
    code = "import sys, indexer.models.tokenizer; print('torch' in sys.modules, 'open_clip' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
