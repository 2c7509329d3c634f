"""The commands that write or inspect an index: index, add-captions, status, remove, check, optimize."""

from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import click

from search.cli.options import device_option, index_option, json_option, model_options, options


def _open_indexer(index, model, pretrained, checkpoint, device="auto", settings=None):
    from indexer.config import index_dir
    from indexer.models import hub

    if not index_dir(index).exists():  # a new index: its model is checked before the catalog's imports
        hub.prepare(model, pretrained, checkpoint)
    from indexer.pipeline import Indexer

    return Indexer.open(
        index, model=model, pretrained=pretrained, checkpoint=checkpoint, device=device, settings=settings
    )


@contextmanager
def _stop_on_interrupt():
    """The first Ctrl-C asks the run to stop after its current batch; a second one stops at once."""
    stop = threading.Event()

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        click.echo("\nstopping after the current batch (Ctrl-C again to stop now)", err=True)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")  # "auto" and vectors.KINDS, without importing faiss for --help
index_type_options = options(
    click.option(
        "--index-type",
        type=click.Choice(INDEX_TYPES),
        help="Vector index kind; auto keeps exact search while it is fast, then ivf, then ivfpq [remembered; auto].",
    ),
    click.option(
        "--memory-budget", metavar="SIZE", help="Memory the vector indexes may use, e.g. 4G [remembered; 4G]."
    ),
    click.option(
        "--latency-budget",
        metavar="TIME",
        help="auto: exact search while one takes at most this here, e.g. 10ms [remembered; 10ms].",
    ),
)


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@index_option
@model_options
@index_type_options
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="",
    metavar="[ADDRESS]",
    help="Decode and embed on Ray: a local Ray on this machine, or the cluster at ADDRESS (auto, ray://HOST:10001).",
)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="With --ray: model actors.")
@click.option(
    "--decode-workers",
    type=click.IntRange(min=0),
    metavar="N",
    help="Processes that decode pictures; 0: threads of this process [auto: every core, processes for large runs].",
)
@click.option("--url-column", metavar="NAME", help="Lists: the column naming pictures [url, URL, image_url, path].")
@click.option("--caption-column", metavar="NAME", help="Lists: the column of captions [caption, TEXT, text].")
@click.option("--collection", metavar="NAME", help="Lists: the collection their captions join [the list's name].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@device_option
@json_option
def index(
    paths,
    index,
    model,
    pretrained,
    checkpoint,
    index_type,
    memory_budget,
    latency_budget,
    ray_address,
    workers,
    decode_workers,
    url_column,
    caption_column,
    collection,
    quiet,
    device,
    as_json,
):
    """Index the pictures in PATHS (folders or files), or those that lists name (with --ray).

    Only new and changed files are decoded; moved or renamed files keep their embedding; files
    that are gone leave the index. Files that cannot be read are recorded and skipped.
    Ctrl-C stops after the current batch, keeping everything done so far. When the collection
    outgrows its vector index kind (see --index-type), the vector files are rebuilt at the end.
    With --ray, a Ray Data pipeline decodes and embeds into shards, which are then ingested;
    PATHS may then be lists (Parquet, CSV, JSONL) of picture URLs or paths with captions, or
    WebDataset .tar shards.

    Reads JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF and MPO (HEIC with the `heif` extra), following
    links; EXIF orientation is applied, transparency flattened onto white, animations give their
    first frame. A file is decoded again only when its size or time changed, and a changed one
    is hashed first, so a moved or copied picture keeps its embedding. Pictures are committed in
    batches of 32: after a crash, running the command again finishes the job without duplicates.
    Ctrl-C exits with status 130. A missing folder (an unplugged disk) is an error that changes
    nothing. The run ends with its bottleneck, the share of time spent waiting for decoded
    pictures, embedding and writing: `decode` means more cores (or --decode-workers) would help,
    `embed` a faster device, `write` a faster disk.
    """
    from tqdm import tqdm

    from indexer.config import IndexSettings, ListSource, RaySettings
    from indexer.sources.pictures import LIST_READERS

    ray = RaySettings(ray_address or None, workers) if ray_address is not None else None
    lists = tuple(str(path) for path in paths if path.is_file() and path.suffix.lower() in LIST_READERS)
    if lists and len(lists) != len(paths):
        raise click.UsageError("give folders and pictures, or lists and WebDataset shards: not both in one run")
    if lists and ray is None:
        raise click.UsageError("lists and WebDataset shards are read on Ray: add --ray")

    settings = IndexSettings()
    if decode_workers is not None:  # 0: in threads, as many as decoding_threads says
        settings = IndexSettings(workers=decode_workers or None, processes=decode_workers > 0)
    opened = _open_indexer(index, model, pretrained, checkpoint, device, settings)
    from indexer.pipeline import IndexReport  # after the model's check: it imports the catalog's engine

    report = IndexReport()
    with opened as indexer, _stop_on_interrupt() as stop:
        # Made once the model is there, so that its download's bar comes first and the rate is the run's.
        bar = tqdm(unit=" pictures", disable=True if quiet else None, file=sys.stderr, dynamic_ncols=True)

        def progress(done: int, total: int) -> None:
            bar.total = total
            if report.stages.bottleneck:  # which stage the run waits on, so far
                bar.set_postfix_str(f"bottleneck: {report.stages.bottleneck} ({report.stages.describe()})", False)
            bar.update(done - bar.n)

        with bar:
            indexer.store.index_setting(index_type, _budget(memory_budget), _latency(latency_budget))
            if lists:
                report = indexer.index_list(ListSource(lists, url_column, caption_column, collection), ray, progress)
            else:
                report = indexer.index(paths, progress=progress, stop=stop, ray=ray, report=report)
    if as_json:
        document = asdict(report)
        document["pictures_per_second"] = report.pictures_per_second
        document["bottleneck"] = report.stages.bottleneck
        click.echo(json.dumps(document, indent=2))
    else:
        where = f" on {report.device}" if report.device else ""
        parts = [f"{report.embedded} embedded{where}"] + [
            f"{count} {name}"
            for name, count in (
                ("captions added", report.captions),
                ("moved", report.moved),
                ("copies reused", report.reused),
                ("removed", report.removed),
                ("unchanged", report.unchanged),
                ("failed", report.failed),
                ("failed before, unchanged", report.known_failures),
            )
            if count
        ]
        if report.stages.bottleneck and report.embedded:  # before the summary, which stays the last line
            decoded = f", decoded in {report.decoders}" if report.decoders else ""
            click.echo(
                f"{report.pictures_per_second:.1f} pictures/s{decoded}; bottleneck: {report.stages.bottleneck} "
                f"({report.stages.describe()} of the time)",
                err=True,
            )
        click.echo(f"{report.found} pictures in {report.seconds:.1f} s: {', '.join(parts)}", err=True)
        for path, reason in report.failures[:10]:
            click.echo(f"  failed: {path}: {reason}", err=True)
        if len(report.failures) > 10:
            click.echo(f"  … and {len(report.failures) - 10} more (clipseek status --failures)", err=True)
    if report.interrupted:
        click.echo("interrupted: what was done is kept; run the same command again to finish", err=True)
        sys.exit(130)


def _budget(text: str | None) -> int | None:
    from indexer.store.index_choice import parse_size

    return parse_size(text) if text is not None else None


def _latency(text: str | None) -> float | None:
    from indexer.store.index_choice import parse_latency

    return parse_latency(text) if text is not None else None


@click.command()
@index_option
@index_type_options
def optimize(index, index_type, memory_budget, latency_budget):
    """Rebuild the vector files as the index kind that fits the collection now, tuned to recall@10 ≥ 0.95
    (0.99 where exact search was nearly within the latency budget).

    Searches keep being answered from the old files until the new ones replace them.
    """
    from indexer.config import index_location
    from indexer.store import Store

    with Store.open(index_location(index), write=True) as store:
        kind, budget, latency = store.index_setting(index_type, _budget(memory_budget), _latency(latency_budget))
        chosen = store.optimize(kind, budget, _progress_bars(), latency)
        decisions = store.decisions()
    for modality, spec in chosen.items():
        why = f"; {decisions[modality].describe()}" if modality in decisions else ""
        click.echo(f"{modality}s: {spec.describe()}{why}")


def _progress_bars():
    """Store progress on stderr: a bar for each phase that counts (a line where stderr is no
    terminal), a line for each phase that does not."""
    from tqdm import tqdm

    bars = {}

    def progress(phase: str, done: int, total: int) -> None:
        if not total:
            click.echo(phase, err=True)
            return
        if phase not in bars:
            bars[phase] = tqdm(desc=phase, total=total, unit="vec", unit_scale=True, file=sys.stderr, disable=None)
            if bars[phase].disable:
                click.echo(f"{phase} {total:,} vectors", err=True)
        bars[phase].update(done - bars[phase].n)
        if done >= total:
            bars[phase].close()

    return progress


@click.command("add-captions")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--collection", required=True, help="The collection the captions join.")
@click.option("--format", "file_format", type=click.Choice(["csv", "tsv", "jsonl", "text"]), help="Default: by suffix.")
@index_option
@model_options
@json_option
def add_captions(file, collection, file_format, index, model, pretrained, checkpoint, as_json):
    """Embed a caption collection (CSV, TSV, JSONL or text, one caption a line) for image→text search.

    CSV, TSV and JSONL give the caption as `caption` or `text`, with optional `id` and `image` (or
    `path`); --format when the suffix does not say. Unreadable rows are listed with their line
    numbers; exact duplicates within a collection are stored once.
    """
    with _open_indexer(index, model, pretrained, checkpoint) as indexer:
        report = indexer.add_captions(file, collection, file_format)
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2))
        return
    click.echo(
        f"{collection}: {report.added} captions added, {report.duplicates} duplicates skipped, "
        f"{len(report.problems)} rows unreadable ({report.seconds:.1f} s)",
        err=True,
    )
    for line, reason in report.problems:
        click.echo(f"  line {line}: {reason}", err=True)


@click.command()
@index_option
@click.option("--failures", "list_failures", is_flag=True, help="List every file that failed, with its reason.")
@json_option
def status(index, list_failures, as_json):
    """What the index holds: items per modality and collection, failures, model, sizes."""
    from indexer.config import index_location
    from indexer.models import backend
    from indexer.models.matcher import available_matchers, none_available
    from indexer.store import Store

    with Store.open(index_location(index)) as store:
        state = store.status()
        failures = store.catalog.failure_list() if list_failures or as_json else []
    runtime = backend.describe(state.model) if state.model else "none yet"
    suited = available_matchers(state.model.architecture) if state.model else []
    if as_json:
        document = asdict(state)
        document["model"] = state.model.to_dict() if state.model else None
        document["runtime"] = runtime
        document["matchers"] = suited
        document["failure_list"] = [{"path": path, "reason": reason} for path, reason in failures]
        click.echo(json.dumps(document, indent=2))
        return
    rows = [("index", state.path), ("model", str(state.model or "none yet")), ("embeds", runtime)]
    if state.embedded_on:
        rows.append(("embedded", f"the latest pictures on {state.embedded_on}"))
    rows.append(("search", state.index_type))
    if suited:
        others = f"; also --matcher {', '.join(suited[1:])}" if suited[1:] else ""
        rows.append(("re-ranks", f"with the {suited[0]} matcher (--rerank){others}"))
    else:
        rows.append(("re-ranks", none_available(state.model.architecture) if state.model else "nothing indexed yet"))
    for number, (modality, collection, count) in enumerate(state.counts):
        label = f"{count} {modality}s" + (f" in collection '{collection}'" if collection else "")
        rows.append(("items" if number == 0 else "", label))
    if not state.counts:
        rows.append(("items", "none"))
    hint = "" if list_failures or not state.failures else " (--failures lists them)"
    rows.append(("failures", f"{state.failures}{hint}"))
    rows.append(("on disk", ", ".join(f"{name} {_size(size)}" for name, size in state.bytes_on_disk.items())))
    updated = datetime.fromtimestamp(state.updated_at) if state.updated_at else None
    when = updated.isoformat(sep=" ", timespec="seconds") if updated else "never"
    rows.append(("updated", f"{when} (generation {state.generation})"))
    for modality, (generation, stale) in state.vector_files.items():
        behind = f"behind the catalog's {modality}s, caught up by the next writing command" if stale else "up to date"
        rows.append(("", f"{modality}.faiss here: generation {generation}, {behind}"))
    for label, value in rows:
        click.echo(f"{label:<10} {value}")
    for path, reason in failures:
        click.echo(f"  {path}: {reason}")


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--collection", help="Remove this caption collection.")
@index_option
def remove(paths, collection, index):
    """Remove the pictures at or under PATHS, and/or a caption collection, from the index."""
    if not paths and not collection:
        raise click.UsageError("name PATHS to remove, or --collection NAME")
    from indexer.config import index_location
    from indexer.store import Store

    with Store.open(index_location(index), write=True) as store:
        removed = store.remove(paths, collection)
    click.echo(f"removed {removed} items", err=True)


@click.command()
@index_option
@click.option("--repair", is_flag=True, help="Rebuild the vector files from the catalog.")
def check(index, repair):
    """Verify that the catalog and the vector files agree; exit status 1 when they do not."""
    from indexer.config import index_location
    from indexer.store import Store

    with Store.open(index_location(index), write=repair) as store:
        problems = store.check()
        if problems and repair:
            store.repair()
            click.echo(f"rebuilt the vector files ({len(problems)} problems found)", err=True)
            problems = store.check()
        generation = store.catalog.generation()
    for problem in problems:
        click.echo(problem)
    if problems:
        click.echo("the index is inconsistent: run `clipseek check --repair`", err=True)
        sys.exit(1)
    click.echo(f"ok: catalog and vector files agree (generation {generation})", err=True)


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"
