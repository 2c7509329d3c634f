import json

import numpy as np
import pytest
from PIL import Image

from indexer.errors import BadFileError
from search.evaluation import read_eval_set, recall


def test_karpathy_json_with_splits_and_several_captions(tmp_path):
    (tmp_path / "val").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / name)
    data = {
        "images": [
            {"filename": "a.jpg", "filepath": "val", "split": "test", "sentences": [{"raw": "one"}, {"raw": "two"}]},
            {"filename": "b.jpg", "filepath": "val", "split": "train", "sentences": [{"raw": "three"}]},
        ]
    }
    (tmp_path / "set.json").write_text(json.dumps(data))
    pairs = read_eval_set(tmp_path / "set.json", tmp_path, split="test")
    assert pairs.images == [tmp_path / "val" / "a.jpg"] and pairs.captions == ["one", "two"] and pairs.owner == [0, 0]
    with pytest.raises(BadFileError, match="no image–caption pairs"):
        read_eval_set(tmp_path / "set.json", tmp_path, split="nope")
    (tmp_path / "bad.json").write_text('{"pictures": []}')
    with pytest.raises(BadFileError, match="neither Karpathy-style JSON nor JSONL"):
        read_eval_set(tmp_path / "bad.json", tmp_path)


def test_recall_counts_ranks_in_both_directions(tmp_path):
    for name in "abc":
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    lines = [{"image": f"{n}.png", "caption": c} for n, c in (("a", "A"), ("b", "B"), ("c", "C"), ("c", "C2"))]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    pairs = read_eval_set(tmp_path / "pairs.jsonl", tmp_path)
    images = np.eye(3, dtype=np.float32)  # a, b, c
    # A finds a; B ranks b second (after a); C finds c; C2 ranks c third.
    texts = np.array([[1, 0, 0], [0.9, 0.5, 0], [0, 0, 1], [0.9, 0.8, 0.1]], dtype=np.float32)
    figures = recall(pairs, lambda batch: images[: len(batch)], lambda captions: texts, side=8)
    assert figures["text→image R@1"] == 0.5 and figures["text→image R@5"] == 1.0
    # a: its caption A ranks first; b: B ranks second (C2 is higher); c: C ranks first.
    assert figures["image→text R@1"] == pytest.approx(2 / 3) and figures["image→text R@5"] == 1.0
