"""`clipseek serve`: the HTTP API and the search page over one index."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import click

from search.cli.options import device_option, index_option, max_pixels_option, weights_option

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def _bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]+)\s*([KMG]?)I?B?\s*", text.upper())
    if not match:
        raise click.BadParameter(f"{text!r} is not a size (for example 20M)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _public_url(ctx, param, text: str | None) -> str:
    """The base of the URLs answers give, without its trailing slash; '' keeps them relative."""
    if not text:
        return ""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise click.BadParameter(f"{text!r} is not an http(s) URL such as https://photos.example.org/clipseek")
    return text.rstrip("/")


@click.command()
@index_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free).")
@click.option("--token", envvar="CLIPSEEK_TOKEN", help="Require 'Authorization: Bearer TOKEN' [env: CLIPSEEK_TOKEN].")
@click.option("--policy", type=click.Path(exists=True, dir_okay=False), help="Moderation policy for POST /moderate.")
@click.option("--max-upload", default="20M", show_default=True, help="Largest request body accepted.")
@max_pixels_option
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help=(
        "Seconds per request, waiting in the queue included: past it, 504"
        " (work already running finishes its current engine call)."
    ),
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Requests that run at once; more wait in the queue [default: CPU count + 4, at most 32].",
)
@click.option(
    "--queue",
    type=click.IntRange(min=0),
    help="Requests that wait for a worker; more are answered 503 with Retry-After [default: 64].",
)
@click.option(
    "--fetch-urls",
    is_flag=True,
    help=(
        "Let /knn-service fetch image_url: public addresses only (no loopback, private, link-local,"
        " multicast or reserved ones, also inside IPv6), no redirects, at most --max-upload bytes."
    ),
)
@click.option("--cors", multiple=True, metavar="ORIGIN", help="Let pages from ORIGIN call the API (repeatable).")
@click.option(
    "--public-url",
    callback=_public_url,
    metavar="URL",
    help="Where clients reach the server (behind a proxy); URLs in answers start with it. Default: relative URLs.",
)
@weights_option
@device_option
def serve(
    index,
    host,
    port,
    token,
    policy,
    max_upload,
    max_pixels,
    timeout,
    workers,
    queue,
    fetch_urls,
    cors,
    public_url,
    checkpoint,
    device,
):
    """Serve the HTTP API and the search page for an index.

    \b
      clipseek serve                         # http://127.0.0.1:8000/
      clipseek serve --token s3cret --policy policy.yaml
      curl 'http://127.0.0.1:8000/search?text=a+cat&k=5'

    The API is described at /docs. It binds to localhost unless --host says otherwise; give a
    --token before opening it to a network. New commits by `clipseek index` are served
    without a restart. Uploaded and fetched pictures larger than --max-pixels are refused with
    413 from their header, before they are decoded.
    """
    try:
        import uvicorn
    except ImportError:
        raise click.ClickException("the HTTP server needs its extra: pip install 'clipseek[server]'") from None
    from indexer.config import index_dir
    from search.engine import SearchEngine
    from search.http.app import create_app
    from search.http.context import ServerSettings
    from search.moderation import Policy

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        click.echo(f"warning: serving {host} without --token: anyone who can reach it can search the index", err=True)
    settings = ServerSettings(
        token=token,
        max_body=_bytes(max_upload),
        timeout=timeout,
        policy=Policy.load(policy) if policy else None,
        fetch_urls=fetch_urls,
        cors=tuple(cors),
        index_name=index_dir(index).name,
        public_url=public_url,
        **{name: value for name, value in (("workers", workers), ("queue", queue)) if value is not None},
    )
    # a matcher is fetched beforehand (clipseek models fetch), never by a request
    engine = SearchEngine.open(index, checkpoint, max_pixels=max_pixels, device=device, fetch_matchers=False)
    click.echo(f"loading the model of {engine.store.root} …", err=True)
    engine.warm()  # the model loaded now, so the first query does not wait for it; the rows it re-ranks from too
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="warning", timeout_keep_alive=30)
