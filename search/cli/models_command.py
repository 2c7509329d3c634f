"""`clipseek models`: the models worth choosing, and `clipseek models fetch` to download one."""

from __future__ import annotations

import json

import click

from search.cli.options import json_option

NOTE = (
    "ImageNet: published zero-shot top-1 (open_clip's results table; MobileCLIP: Apple's model card). "
    "weights: at float32.\n"
    "A new index takes one with: clipseek index DIR --index NAME --model MODEL --pretrained TAG\n"
    "Download one for later, or to copy to a machine without internet access: clipseek models fetch MODEL"
)
MATCHERS_NOTE = "Matchers (clipseek search --rerank [N] --matcher NAME), chosen at query time:"


@click.group(invoke_without_command=True)
@click.option(
    "--bench",
    metavar="MODEL",
    multiple=True,
    help="Measure how fast MODEL embeds here, relative to the default (random weights: nothing is downloaded).",
)
@json_option
@click.pass_context
def models(ctx: click.Context, bench: tuple[str, ...], as_json: bool) -> None:
    """The models worth choosing for real photos: languages, size, accuracy, cached or not, ONNX path.

    Accuracy is the published ImageNet zero-shot top-1 (open_clip's results table; MobileCLIP-S1:
    Apple's model card); sizes are the weights at float32. SigLIP and the multilingual models need
    the `hf` extra and read their tokenizer from a hub repository of their own, fetched and checked
    like the weights. Any other open_clip architecture and tag works too, as does
    `hf-hub:ORG/REPO`; `demo` is the bundled demo model.
    """
    if ctx.invoked_subcommand is not None:
        return
    if bench:
        _bench(bench, as_json)
        return
    rows = [_row(choice) for choice in _choices()]
    matchers = _matchers()
    if as_json:
        click.echo(json.dumps({"models": rows, "matchers": matchers}, indent=2, ensure_ascii=False))
        return
    header = ("model", "tag", "for", "languages", "dim", "weights", "ImageNet", "cached", "ONNX path")
    table = [header] + [
        (
            row["model"],
            row["pretrained"],
            row["role"],
            row["languages"],
            str(row["dim"]),
            f"{row['weights_bytes'] / 1e6:,.0f} MB",
            f"{row['imagenet_top1']:.1f}%",
            "yes" if row["cached"] else "no",
            {True: "yes", False: "no (torch)", None: "not tried yet"}[row["onnx"]],
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    refused = [row for row in rows if row["onnx"] is False]
    if refused:  # the runtime says why: "torch: <the exporter's reason>"
        click.echo("\nNot on the ONNX path:")
        for row in refused:
            click.echo(f"  {row['model']} / {row['pretrained']}: {row['runtime'].removeprefix('torch: ')}")
    click.echo("\n" + NOTE)
    click.echo("\n" + MATCHERS_NOTE)
    for row in matchers:
        cached = "cached" if row["cached"] else f"not cached (clipseek models fetch {row['name']})"
        cached = "bundled" if row["repo"] is None else cached
        click.echo(f"  {row['name']:<5} {row['what']}, for {row['for']} indexes; {row['weights']}, {cached}")


def _bench(names: tuple[str, ...], as_json: bool) -> None:
    from indexer.models.identity import DEFAULT_MODEL
    from indexer.models.speed import measure

    speeds = [measure(name) for name in dict.fromkeys((DEFAULT_MODEL, *names))]
    base = speeds[0]
    rows = [
        {
            "model": speed.model,
            "images_per_s": round(speed.images_per_s, 2),
            "texts_per_s": round(speed.texts_per_s, 2),
            "images_vs_default": round(speed.images_per_s / base.images_per_s, 3),
            "texts_vs_default": round(speed.texts_per_s / base.texts_per_s, 3),
        }
        for speed in speeds
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(row["model"]) for row in rows)
    click.echo(f"{'model':<{width}}  images/s  texts/s  vs {DEFAULT_MODEL} (images, texts)")
    for row in rows:
        click.echo(
            f"{row['model']:<{width}}  {row['images_per_s']:>8.1f}  {row['texts_per_s']:>7.1f}  "
            f"×{row['images_vs_default']:.2f}, ×{row['texts_vs_default']:.2f}"
        )
    click.echo("measured with torch at random initialisation, on this machine", err=True)


def _choices():
    from indexer.models.choices import CHOICES

    return CHOICES


def _matchers() -> list[dict]:
    from indexer.models import hub
    from indexer.models.matcher import BLIP_FILES, BLIP_SIZE, matcher_weights

    return [
        {
            "name": "demo",
            "what": "a small cross-attention model of the demo world",
            "for": "demo",
            "repo": None,
            "weights": f"{matcher_weights().stat().st_size / 1e6:.1f} MB" if matcher_weights().is_file() else "missing",
            "cached": matcher_weights().is_file(),
            "cache_folder": None,
        },
        {
            "name": "blip",
            "what": f"BLIP's image-text matching ({BLIP_FILES.repo}), torch",
            "for": "real models'",
            "repo": BLIP_FILES.repo,
            "weights": BLIP_SIZE,
            "cached": hub.cached(BLIP_FILES) is not None,
            "cache_folder": str(hub.repo_folder(BLIP_FILES)),
        },
    ]


def _row(choice) -> dict:
    from indexer.models import backend, hub
    from indexer.models.identity import ModelId

    model_id = ModelId(choice.architecture, choice.pretrained, None, choice.dim, choice.image_size)
    files = hub.files_for(choice.architecture, choice.pretrained)
    return {
        "model": choice.architecture,
        "pretrained": choice.pretrained,
        "role": choice.role,
        "languages": choice.languages,
        "dim": choice.dim,
        "params_m": choice.params_m,
        "weights_bytes": choice.weights_bytes,
        "imagenet_top1": choice.imagenet_top1,
        "source": choice.source,
        "hf_repo": choice.hf_repo,
        "cached": hub.cached(files) is not None,
        "cache_folder": str(hub.repo_folder(files)),
        "onnx": backend.exported(model_id),
        "runtime": backend.describe(model_id),
    }


@models.command()
@click.argument("name")
@click.option("--pretrained", metavar="TAG", help="Its pretrained tag [the listed one].")
@json_option
def fetch(name: str, pretrained: str | None, as_json: bool) -> None:
    """Download a model's weights into the cache, for offline use later.

    NAME is a listed model (its listed tag unless --pretrained says), any open_clip architecture
    with --pretrained, hf-hub:ORG/REPO, or blip (the matcher that re-ranks real photos). The folder
    printed is what to copy to another machine.
    """
    from indexer.errors import ModelError
    from indexer.models import hub
    from indexer.models.choices import choice_of
    from indexer.models.matcher import BLIP_FILES

    if name == BLIP_FILES.fetch_args:  # the blip matcher: its weights and the files beside them
        label, path = BLIP_FILES.label, hub.weights_file(BLIP_FILES)
        _fetched(label, path, as_json)
        return
    if pretrained is None and not name.startswith(hub.HF_HUB_PREFIX):
        choice = choice_of(name)
        if choice is None:
            raise ModelError(f"{name} is not listed by `clipseek models`: say which weights with --pretrained TAG")
        pretrained = choice.pretrained
    if not name.startswith(hub.HF_HUB_PREFIX):
        hub.text_files(name)  # a Hugging Face tokenizer's files, which the model reads too
    files = hub.files_for(name, pretrained)
    if files is not None:
        label, path = files.label, hub.weights_file(files)
    else:  # a tag outside the list: open_clip's own table (read with torch) says where it is
        from indexer.models.encoder import fetch_weights

        label, path = f"{name} / {pretrained}", fetch_weights(name, pretrained)
    _fetched(label, path, as_json)


def _fetched(label: str, path, as_json: bool) -> None:
    # What to copy: the repository's folder in the hub's cache (a plain file for URL tags).
    folder = next((parent for parent in path.parents if parent.name.startswith("models--")), path)
    if as_json:
        click.echo(json.dumps({"model": label, "weights": str(path), "folder": str(folder)}, indent=2))
        return
    click.echo(f"{label}: {path}")
    click.echo(f"to use it on a machine without internet access, copy {folder} to the same place there", err=True)
