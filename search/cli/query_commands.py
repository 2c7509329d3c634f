"""The commands that query an index: search, similar, classify, moderate, eval."""

from __future__ import annotations

import json
import os
import re

import click

from indexer.config import DEFAULT_RERANK
from search.cli.options import (
    MinScore,
    device_option,
    index_option,
    json_option,
    max_pixels_option,
    model_options,
    output_options,
    weights_option,
)


def _weighted(text: str) -> tuple[str, float]:
    """'TEXT' or 'TEXT@WEIGHT'."""
    match = re.fullmatch(r"(.*)@(-?[0-9]*\.?[0-9]+)", text, flags=re.DOTALL)
    return (match.group(1), float(match.group(2))) if match else (text, 1.0)


def _query(text, image, item, add, subtract, add_image):
    from search.engine import Query

    query = Query()
    if text is not None:
        query += Query.text(text)
    if image is not None:
        query += Query.image(image)
    if item is not None:
        query += Query.item(item)
    for term, sign in [(t, 1.0) for t in add] + [(t, -1.0) for t in subtract]:
        words, weight = _weighted(term)
        query += sign * weight * Query.text(words)
    for term in add_image:
        picture, weight = _weighted(term)
        query += weight * Query.image(picture)
    if not query.terms:
        raise click.UsageError("give a QUERY text, --image PATH or --item ID")
    return query


def _print_hits(hits, as_json, paths_only, header):
    if as_json:
        click.echo(json.dumps({**header, "hits": [hit.to_dict() for hit in hits]}, indent=2, ensure_ascii=False))
    elif paths_only:
        for hit in hits:
            click.echo(hit.path if hit.modality == "image" else hit.caption)
    else:
        reranked = any(hit.match is not None for hit in hits)
        if reranked:
            click.echo("cosine   match  (ordered by match and cosine together)")
        for hit in hits:
            where = hit.path if hit.modality == "image" else f"[{hit.collection}] {hit.caption}"
            match = "" if not reranked else "     -  " if hit.match is None else f"{hit.match:6.3f}  "
            click.echo(f"{hit.score:6.3f}  {match}{where}")
        if not hits:
            click.echo("no results", err=True)


def _cap(k: int) -> int:
    from search.engine import MAX_K

    if k > MAX_K:
        click.echo(f"k capped at {MAX_K}", err=True)
    return min(k, MAX_K)


@click.command()
@click.argument("text", required=False)
@click.option("--image", type=click.Path(dir_okay=False), help="Query with a picture.")
@click.option("--item", type=int, help="Query with a stored item (its id).")
@click.option("--add", multiple=True, metavar="TEXT[@W]", help="Add a text to the query (weight W, default 1).")
@click.option("--subtract", multiple=True, metavar="TEXT[@W]", help="Subtract a text from the query.")
@click.option("--add-image", multiple=True, metavar="PATH[@W]", help="Add a picture to the query.")
@click.option("--texts", is_flag=True, help="Search captions instead of pictures (image → text).")
@click.option("-k", "k", default=10, show_default=True, type=int, help="How many results.")
@click.option("--offset", default=0, show_default=True, type=click.IntRange(min=0), help="Skip this many first.")
@click.option("--path", "path_filter", metavar="DIR|GLOB", help="Only pictures under DIR, or matching GLOB.")
@click.option("--collection", help="Only captions of this collection.")
@click.option("--from", "date_from", metavar="DATE", help="Only pictures taken on or after DATE (YYYY-MM-DD).")
@click.option("--to", "date_to", metavar="DATE", help="Only pictures taken on or before DATE.")
@click.option(
    "--min-score",
    type=MinScore(),
    help="Only results at least this similar; `match`: from where the model (SigLIP's kind) sees a match.",
)
@click.option(
    "--rerank",
    type=click.IntRange(min=1),
    is_flag=False,
    flag_value=DEFAULT_RERANK,
    metavar="[N]",
    help=f"Re-score the first N candidates (default {DEFAULT_RERANK}) with a matcher that reads the query with each.",
)
@click.option(
    "--matcher",
    metavar="NAME",
    help="The matcher for --rerank: demo (demo indexes) or blip (real photos; downloaded once) "
    "[the one on this machine for the index's model].",
)
@output_options
@index_option
@weights_option
@device_option
def search(
    text,
    image,
    item,
    add,
    subtract,
    add_image,
    texts,
    k,
    offset,
    path_filter,
    collection,
    date_from,
    date_to,
    min_score,
    rerank,
    matcher,
    as_json,
    paths_only,
    index,
    checkpoint,
    device,
):
    """Find pictures (or, with --texts, captions) nearest to a text, a picture or a mix.

    \b
      clipseek search "a cat sunbathing"
      clipseek search --image cat.jpg --add "at night"
      clipseek search beach --add dog --subtract people@0.5
      clipseek search --image cat.jpg --texts
      clipseek search "a red circle on the left and a blue square on the right" --rerank

    Scores are cosine similarities, and what one means depends on the model's training. With
    CLIP's softmax loss (ViT-B-32, the XLM-RoBERTa models, MobileCLIP) a text and a matching
    picture commonly score 0.25 to 0.35, unrelated ones a little less: scores only rank. Models
    trained with SigLIP's sigmoid loss (SigLIP, SigLIP 2, NLLB-SigLIP) have a cosine of their own
    where a pair becomes more likely a match than not: --min-score match filters on it (an error
    with a softmax model). A numeric --min-score holds only for the model it was set with. A
    filtered search returns the exact top k among the matching items.
    """
    if matcher is not None and rerank is None:
        raise click.UsageError("--matcher chooses the matcher of --rerank: give --rerank too")
    from search.engine import SearchEngine

    query = _query(text, image, item, add, subtract, add_image)
    if path_filter and not path_filter.startswith(("/", "*", "?", "[")):
        path_filter = os.path.abspath(path_filter)
    with SearchEngine.open(index, checkpoint, device=device) as engine:
        hits = engine.search(
            query,
            k=_cap(k),
            modality="text" if texts else "image",
            path=path_filter,
            collection=collection,
            date_from=date_from,
            date_to=date_to,
            min_score=min_score,
            offset=offset,
            rerank=rerank,
            matcher=matcher,
        )
    header = {"query": repr(query), "k": k, "offset": offset}
    if rerank is not None:
        header["rerank"] = rerank
    _print_hits(hits, as_json, paths_only, header)


@click.command()
@click.argument("picture", required=False, type=click.Path(dir_okay=False))
@click.option("--item", type=int, help="A stored item (its id) instead of a picture.")
@click.option("--threshold", default=0.9, show_default=True, type=click.FloatRange(-1, 1), help="Minimum similarity.")
@click.option("-k", "k", default=100, show_default=True, type=int, help="At most this many.")
@output_options
@index_option
@weights_option
def similar(picture, item, threshold, k, as_json, paths_only, index, checkpoint):
    """Pictures that look like PICTURE (or a stored --item): near-duplicates at a high threshold."""
    from search.engine import Query, SearchEngine

    if (picture is None) == (item is None):
        raise click.UsageError("give a PICTURE or --item ID")
    with SearchEngine.open(index, checkpoint) as engine:
        hits = engine.similar(item if item is not None else Query.image(picture), threshold=threshold, k=_cap(k))
    _print_hits(hits, as_json, paths_only, {"threshold": threshold})


@click.command()
@click.argument("pictures", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--labels", required=True, help='Comma-separated labels, e.g. "cat,dog,car".')
@click.option("--template", default="a photo of a {}.", show_default=True, help="How a label becomes a text.")
@json_option
@index_option
@weights_option
def classify(pictures, labels, template, as_json, index, checkpoint):
    """Zero-shot classification of PICTURES among --labels, with the index's model."""
    from search.engine import SearchEngine

    if "{}" not in template:
        raise click.UsageError("--template must contain {} where the label goes")
    with SearchEngine.open(index, checkpoint) as engine:
        results = engine.classify(list(pictures), labels.split(","), template)
    if as_json:
        click.echo(json.dumps([{"path": p, "labels": r} for p, r in zip(pictures, results, strict=True)], indent=2))
        return
    for picture, probabilities in zip(pictures, results, strict=True):
        best = ", ".join(f"{label} {p:.2f}" for label, p in list(probabilities.items())[:3])
        click.echo(f"{picture}: {best}")


@click.command()
@click.argument("pictures", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--text", help="Text that comes with the pictures (a caption, a comment); judged alone without PICTURES.")
@click.option("--policy", "policy_file", required=True, metavar="FILE", help="The policy: a YAML or JSON file.")
@max_pixels_option
@json_option
@index_option
@weights_option
def moderate(pictures, text, policy_file, max_pixels, as_json, index, checkpoint):
    """Judge PICTURES, a --text, or both against a moderation policy: block, review or allow.

    \b
      clipseek moderate upload.jpg --policy policy.yaml
      clipseek moderate *.jpg --text "for sale, DM me" --policy policy.yaml --json
      clipseek moderate --text "a comment to check" --policy policy.yaml

    The policy's concepts score each picture and the text by similarity to their prompts; its
    blocklists match pictures that look like the ones under a folder of the index (--index).
    People get one line per picture: the decision, the picture, the reasons. The exit status is
    0 whatever the decisions and 1 for errors (an unreadable picture or policy): scripts should
    read the decisions from --json. A picture larger than --max-pixels is an error, found from
    its header before anything is decoded.
    """
    from indexer.errors import PixelBudgetError
    from search.engine import SearchEngine
    from search.moderation import Policy

    if not pictures and not text:
        raise click.UsageError("give PICTURES, --text TEXT or both")
    policy = Policy.load(policy_file)  # before the index and model: a bad policy fails at once
    items = [(picture, text) for picture in pictures] or [(None, text)]
    with SearchEngine.open(index, checkpoint, max_pixels=max_pixels) as engine:
        try:
            verdicts = engine.moderate_many(items, policy)
        except PixelBudgetError as error:
            raise click.ClickException(f"{error} (--max-pixels sets it)") from error
    if as_json:
        results = [
            {"image": image, "text": text, **verdict.to_dict()}
            for (image, _), verdict in zip(items, verdicts, strict=True)
        ]
        click.echo(json.dumps({"policy": policy_file, "results": results}, indent=2, ensure_ascii=False))
        return
    for (image, _), verdict in zip(items, verdicts, strict=True):
        subject = image if image is not None else json.dumps(text, ensure_ascii=False)
        click.echo(f"{verdict.decision:<6}  {subject}  {'; '.join(verdict.reasons)}".rstrip())


@click.command("eval")
@click.argument("captions", type=click.Path(exists=True, dir_okay=False))
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False), help="Where the pictures are.")
@click.option("--split", help="Only this split of a Karpathy-style file (e.g. test).")
@model_options
@json_option
@index_option
def evaluate(captions, images, split, model, pretrained, checkpoint, as_json, index):
    """Recall@1/5/10 of a model on an image–caption set, both directions.

    CAPTIONS is Karpathy-style JSON (Flickr30k, COCO) or JSONL pairs ({"image", "caption"}).
    The model is the index's own, or the one named by --model/--pretrained/--checkpoint.
    """
    from search.evaluation import read_eval_set, recall

    pairs = read_eval_set(captions, images, split)
    if model or pretrained or checkpoint:
        from indexer.models import hub

        hub.prepare(model, pretrained, checkpoint)  # fails fast, before torch
        from indexer.models.encoder import load_encoder

        encoder = load_encoder(model or "ViT-B-32", pretrained, checkpoint)
    else:
        from search.engine import SearchEngine

        with SearchEngine.open(index) as engine:
            encoder = engine.encoder
    figures = recall(pairs, encoder.embed_images, encoder.embed_texts, encoder.model_id.side)
    if as_json:
        document = {"model": str(encoder.model_id), "pairs": len(pairs.captions), **figures}
        click.echo(json.dumps(document, indent=2, ensure_ascii=False))
        return
    click.echo(f"{len(pairs.images)} pictures, {len(pairs.captions)} captions, {encoder.model_id}")
    for name, value in figures.items():
        click.echo(f"  {name:<18} {value:.3f}")
