"""Rank a demo library's pictures for a text query with the bundled demo model (`make demo`).

    .venv/bin/python data/rank_demo.py LIBRARY "a large red circle" [--top 8]

Embeds every picture listed in LIBRARY/captions.jsonl and prints the best matches with their
true captions, so the result can be checked by eye. This stands in for `clipseek index` +
`clipseek search` until the indexer lands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from indexer.encoder import load_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", type=Path)
    parser.add_argument("query")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()

    lines = (args.library / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    encoder = load_encoder("demo")
    images = []
    for row in rows:
        with Image.open(args.library / row["image"]) as image:
            images.append(image.convert("RGB"))
    scores = encoder.embed_images(images) @ encoder.embed_texts([args.query])[0]
    print(f'"{args.query}": best {args.top} of {len(rows)} pictures, {encoder.model_id}')
    for index in scores.argsort()[::-1][: args.top]:
        print(f"  {scores[index]:.3f}  {rows[index]['image']:<40}  {rows[index]['caption']}")


if __name__ == "__main__":
    main()
