"""The `clipseek` command: parse, call one library function, format.

Heavy modules (torch, open_clip, faiss, sqlalchemy) are imported inside the commands that need
them, so that `clipseek --help` and `clipseek --version` answer at once. Results go to stdout,
messages and progress to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

import click

from indexer.errors import ClipseekError, ClipseekWarning
from search.cli import index_commands, models_command, query_commands, serve_command


class _Group(click.Group):
    """Turns clipseek's own errors into a one-line message and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        default = warnings.showwarning
        warnings.showwarning = _show_warning(default)
        try:
            return super().invoke(ctx)
        except ClipseekError as error:
            raise click.ClickException(str(error)) from error
        finally:
            warnings.showwarning = default


def _show_warning(default):
    """clipseek's own warnings as one line on stderr, like its errors; others as Python shows them."""

    def show(message, category, *args, **kwargs):
        if issubclass(category, ClipseekWarning):
            click.echo(f"Warning: {message}", err=True)
        else:
            default(message, category, *args, **kwargs)

    return show


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clipseek", prog_name="clipseek")
def cli() -> None:
    """Search photo libraries and caption collections with CLIP."""
    # The library's notes on slow one-time work (exporting a model to ONNX) go to stderr as they are.
    logger = logging.getLogger("clipseek")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler(sys.stderr))
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main() -> None:
    """The `clipseek` console command: `cli`, then an exit without Python's teardown.

    Freeing a loaded model, its runtime's threads and the vectors, module by module, takes about
    0.2 s, a quarter of a cold query. Every command has closed what it opened (the index, files,
    the server) by the time it returns, and output is flushed here, so nothing is lost by
    skipping it; only atexit hooks are, and clipseek registers none.
    """
    try:
        cli.main(prog_name="clipseek")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        if isinstance(exit_.code, str):
            click.echo(exit_.code, err=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a reader that went away (`clipseek search … | head -1`)
            stream.flush()
    os._exit(code)


for command in (
    index_commands.index,
    index_commands.add_captions,
    index_commands.status,
    index_commands.remove,
    index_commands.check,
    index_commands.optimize,
    query_commands.search,
    query_commands.similar,
    query_commands.classify,
    query_commands.moderate,
    query_commands.evaluate,
    serve_command.serve,
    models_command.models,
):
    cli.add_command(command)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, writable=True, path_type=Path))
@click.option("--count", default=200, show_default=True, type=click.IntRange(min=1), help="Pictures to write.")
@click.option("--seed", default=0, show_default=True, type=int, help="The same seed writes the same files.")
@click.option(
    "--pairs",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Also write this many two-object pictures (in pairs/), for --rerank to tell apart.",
)
def demo(directory: Path, count: int, seed: int, pairs: int) -> None:
    """Write a demo photo library into DIRECTORY.

    Generated pictures of the demo world (coloured shapes on textured backgrounds), as JPEG and
    PNG files in nested folders, with captions naming each picture's attributes: in English
    (captions.jsonl) and in Chinese (captions.zh.jsonl). The bundled demo model (--model demo)
    knows this world in both languages. With --pairs, two-object pictures too ("a small red
    circle on the left and a large blue square on the right"), each beside its twin with the
    colours swapped, and pairs/captions.jsonl.
    """
    from indexer.demo_world import write_library

    with click.progressbar(length=count, label="writing pictures", file=sys.stderr) as bar:
        pictures = write_library(directory, count, seed, progress=bar.update)
    click.echo(f"wrote {len(pictures)} pictures, captions.jsonl and captions.zh.jsonl to {directory}", err=True)
    if pairs:
        from indexer.demo_pairs import write_pairs

        written = write_pairs(directory, pairs, seed + 7)
        click.echo(f"wrote {len(written)} two-object pictures and pairs/captions.jsonl to {directory}", err=True)
