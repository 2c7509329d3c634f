"""Embedding on Ray (the only ray importer): pictures → embedding shards, as a Ray Data pipeline.

    pictures: files found by a walk, or the rows of a list (Parquet, CSV, JSONL) of URLs, object-store
              URIs or paths with captions, or the samples of WebDataset tar shards (Ray's own readers)
      → read or fetch, hash, decode, preprocess   CPU tasks, as many as the cluster has CPUs for
      → embed pictures (and captions)            a pool of model actors, one model load (and GPU, if any) each
      → Parquet shards                           one row per picture: metadata and embedding, or why it failed

Nothing here schedules, retries or moves data: Ray does (a task or actor lost with its worker is
run again). Without an address, a local Ray is started on this machine for the run; with one,
the run joins that cluster, whose nodes need clipseek installed and the sources readable.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.data  # now, not at first use: its loggers are set up on import

from indexer.config import ListSource, RaySettings
from indexer.errors import BadFileError, ClipseekError
from indexer.models.identity import ModelId
from indexer.sources.pictures import LIST_READERS, FileEntry, file_hash, prepare_picture
from indexer.sources.remote import read_source

SHARD_ROWS = 1024  # pictures per Parquet shard, at least
# A decoding task asks for half a CPU: not what a model actor asks for, so Ray keeps the two
# stages apart (it fuses stages with the same needs) and decodes beside the model, as a plain
# run's threads do, instead of in turn with it.
DECODE_CPUS = 0.5
URL_COLUMNS = ("url", "URL", "image_url", "path", "image_path")
CAPTION_COLUMNS = ("caption", "TEXT", "text")
PICTURE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # WebDataset sample members, in this order


@dataclass(frozen=True)
class ModelSource:
    """What a worker needs to load the index's model: its identity and, if it came from a file, the
    file; and the device asked for (a model actor given a GPU by Ray embeds on it whatever it says,
    except "cpu", which asks Ray for no GPU)."""

    model_id: ModelId
    checkpoint: str | None
    device: str = "auto"


def embed(entries: Sequence[FileEntry], model: ModelSource, preprocess: Callable, out: Path, settings: RaySettings):
    """Embed the pictures of `entries` (from a walk) on Ray into Parquet shards in `out` (see indexer.ray.shards)."""
    with _ray(settings):
        rows = [{"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns} for e in entries]
        blocks = max(1, math.ceil(len(rows) / settings.batch_size))
        _write(ray.data.from_items(rows, override_num_blocks=blocks), model, preprocess, out, settings)


def embed_list(
    source: ListSource, known: set[bytes], model: ModelSource, preprocess: Callable, out: Path, settings: RaySettings
):
    """Embed the pictures a list or WebDataset shards name, less those in `known` (indexed or failed
    before), with their captions, on Ray into Parquet shards in `out`."""
    kinds = {LIST_READERS.get(Path(path).suffix.lower()) for path in source.paths}
    if None in kinds or len(kinds) != 1:
        raise ClipseekError(f"lists of one kind at a time ({', '.join(LIST_READERS)}), not {', '.join(source.paths)}")
    kind = kinds.pop()
    collection = source.collection or Path(source.paths[0]).stem
    with _ray(settings):
        paths = list(source.paths)
        if kind == "webdataset":
            dataset = ray.data.read_webdataset(paths, decoder=None, include_paths=True)
            fn_kwargs = {"known": known, "collection": collection}
            rows = dataset.map_batches(_samples, fn_kwargs=fn_kwargs, batch_format="numpy")
        else:
            reader = {"parquet": ray.data.read_parquet, "csv": ray.data.read_csv, "json": ray.data.read_json}[kind]
            dataset = reader(paths, lines=True) if kind == "json" and paths[0].endswith(".jsonl") else reader(paths)
            url, caption = _columns(dataset.columns(), source)
            fn_kwargs = {"url": url, "caption": caption, "known": known, "collection": collection}
            rows = dataset.map_batches(_listed, fn_kwargs=fn_kwargs, batch_format="numpy")
        _write(rows, model, preprocess, out, settings)


def _columns(columns: list[str], source: ListSource) -> tuple[str, str | None]:
    url = source.url_column or next((name for name in URL_COLUMNS if name in columns), None)
    if url not in columns:
        raise ClipseekError(
            f"the list has no column {url or 'of URLs'} (it has {', '.join(columns)}): say --url-column"
        )
    caption = source.caption_column or next((name for name in CAPTION_COLUMNS if name in columns), None)
    if caption is not None and caption not in columns:
        raise ClipseekError(f"the list has no column {caption} (it has {', '.join(columns)})")
    return url, caption


def _listed(batch: dict, url: str, caption: str | None, known: set[bytes], collection: str) -> dict:
    """A list's rows as pictures to read: sources not indexed or failed before."""
    sources = [str(value).encode() if value is not None else b"" for value in batch[url]]
    keep = [number for number, source in enumerate(sources) if source and source not in known]
    captions = batch[caption] if caption is not None else [""] * len(sources)
    return _pictures([sources[n] for n in keep], [captions[n] for n in keep], None, collection)


def _samples(batch: dict, known: set[bytes], collection: str) -> dict:
    """WebDataset samples as pictures: named `SHARD#KEY`, their bytes inline, their .txt as caption."""
    sources, data, captions = [], [], []
    for number, key in enumerate(batch["__key__"]):
        source = f"{batch['path'][number]}#{key}".encode()
        picture = next((batch[s][number] for s in PICTURE_SUFFIXES if s in batch and batch[s][number]), None)
        if source in known:
            continue
        sources.append(source)
        data.append(picture or b"")
        text = batch["txt"][number] if "txt" in batch else b""
        captions.append(text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text or ""))
    return _pictures(sources, captions, data, collection)


def _pictures(sources: list[bytes], captions: list, data: list[bytes] | None, collection: str) -> dict:
    count = len(sources)
    batch = {
        "path": np.array(sources, dtype=object),
        "size": np.zeros(count, np.int64),  # known once read
        "mtime_ns": np.zeros(count, np.int64),  # a list says no time: a picture is dated by its EXIF only
        "caption": np.array([str(c) if c is not None else "" for c in captions], dtype=object),
        "collection": np.array([collection] * count, dtype=object),
    }
    if data is not None:
        batch["data"] = np.array(data, dtype=object)
    return batch


def _write(dataset, model: ModelSource, preprocess: Callable, out: Path, settings: RaySettings) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gpus = ray.cluster_resources().get("GPU", 0)
    dataset = dataset.map_batches(
        _decode,
        fn_kwargs={"side": model.model_id.side, "preprocess": preprocess, "settings": settings},
        batch_size=settings.batch_size,
        batch_format="numpy",
        num_cpus=DECODE_CPUS,
    )
    dataset = dataset.map_batches(
        _Embedder,
        fn_constructor_kwargs={"model": model},
        compute=ray.data.ActorPoolStrategy(size=settings.workers),
        batch_size=settings.batch_size,
        batch_format="numpy",
        num_gpus=1 if gpus >= settings.workers and model.device != "cpu" else 0,
    )
    try:
        dataset.write_parquet(str(out), min_rows_per_file=SHARD_ROWS)
    except ray.exceptions.RayError as error:  # a source Ray's readers refuse, a model that will not load …
        cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
        raise ClipseekError(f"the Ray run failed: {cause}") from None


class _ray:
    """Ray for one run: the cluster at the settings' address, or a local Ray started here and stopped
    after (`clipseek` exits without Python's teardown, which would otherwise be what stops it)."""

    def __init__(self, settings: RaySettings):
        self.settings = settings
        self.started = False

    def __enter__(self) -> None:
        if not ray.is_initialized():
            self._start()
        # Ray Data logs its plan and progress at INFO on stderr, a block every few seconds where
        # stderr is no terminal: for the run, its console shows warnings and errors only (its log
        # files under Ray's session folder keep everything; its bars on a terminal are not logging).
        self.consoles = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
        self.levels = [handler.level for handler in self.consoles]
        for handler in self.consoles:
            handler.setLevel(max(handler.level, logging.WARNING))
        if self.started:
            logging.getLogger("ray.data.dataset").addFilter(_no_false_cpu_alarm)

    def _start(self) -> None:
        # The workers see the same model cache and runtime choice as this process.
        env = {name: value for name, value in os.environ.items() if name.startswith("CLIPSEEK_")}
        options = {
            "runtime_env": {"env_vars": env},
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,  # not "Started a local Ray instance" and the like
        }
        try:
            if self.settings.address:
                ray.init(address=self.settings.address, **options)
            else:
                # Room for the embedding actors and for decoding tasks beside them.
                ray.init(num_cpus=max(os.cpu_count() or 1, self.settings.workers + 1), **options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = self.settings.address or "this machine"
            raise ClipseekError(f"could not start or join Ray at {where}: {error}") from None
        self.started = True

    def __exit__(self, *exc) -> None:
        if self.started:
            ray.shutdown()
            logging.getLogger("ray.data.dataset").removeFilter(_no_false_cpu_alarm)
        for handler, level in zip(self.consoles, self.levels, strict=True):
            handler.setLevel(level)


def _no_false_cpu_alarm(record: logging.LogRecord) -> bool:
    """Ray Data warns that "the Dataset job will hang" whenever its run starts at a moment when
    the actors and decoding tasks hold every CPU; on the local Ray started here, sized for both,
    it never hangs, so the warning is only alarming (it came one run in three on 2 cores)."""
    return "does not have any available CPUs" not in record.getMessage()


def _decode(batch: dict, side: int, preprocess: Callable, settings: RaySettings) -> dict:
    """In a CPU task: each picture read (fetched), hashed, decoded and preprocessed, or the reason it could not be."""
    count = len(batch["path"])
    pixels, columns = [], {name: [] for name in ("size", "sha256", "width", "height", "taken_at", "failure")}
    for number in range(count):
        path, size, mtime_ns = bytes(batch["path"][number]), int(batch["size"][number]), int(batch["mtime_ns"][number])
        try:
            if "caption" in batch:  # from a list or WebDataset: read whole (fetched, bounded), or inline
                if "data" in batch:
                    data = bytes(batch["data"][number])
                else:
                    data = read_source(path.decode(), settings.fetch_timeout, settings.fetch_max_bytes)
                size, sha256 = len(data), hashlib.sha256(data).hexdigest()
                prepared = prepare_picture(io.BytesIO(data), None, side, preprocess)
            else:  # a file found by a walk, with its size and time
                sha256 = file_hash(path)
                prepared = prepare_picture(path, mtime_ns, side, preprocess)
            values = (size, sha256, prepared.width, prepared.height, prepared.taken_at or "", "")
            pixels.append(np.asarray(prepared.pixels, dtype=np.float32))
        except BadFileError as error:
            values = (size, "", 0, 0, "", str(error))
            pixels.append(None)
        for name, value in zip(columns, values, strict=True):
            columns[name].append(value)
    shape = next((p.shape for p in pixels if p is not None), (1,))
    out = {name: batch[name] for name in ("path", "mtime_ns", "caption", "collection") if name in batch}
    for name, values in columns.items():
        out[name] = np.asarray(values, dtype=np.int64 if name in ("size", "width", "height") else object)
    out["pixels"] = np.stack([p if p is not None else np.zeros(shape, np.float32) for p in pixels])
    return out


class _Embedder:
    """A model actor: loads the index's model once, then embeds batch after batch."""

    def __init__(self, model: ModelSource):
        from indexer.models import devices
        from indexer.models.backend import encoder_of  # in the worker: the same choice of runtime as everywhere

        # Ray shows an actor only the GPU it was given (CUDA_VISIBLE_DEVICES), as cuda:0.
        placement = devices.place("cuda:0" if ray.get_gpu_ids() else model.device)
        self.encoder = encoder_of(model.model_id, model.checkpoint, placement=placement)

    def __call__(self, batch: dict) -> dict:
        good = np.flatnonzero(batch["failure"] == "")
        out = {name: values for name, values in batch.items() if name != "pixels"}
        out["vector"] = np.full(len(batch["path"]), b"", dtype=object)
        if len(good):
            for row, vector in zip(good, self.encoder.embed_preprocessed(list(batch["pixels"][good])), strict=True):
                out["vector"][row] = np.asarray(vector, dtype="<f4").tobytes()
        if "caption" in batch:  # a list's captions, of the pictures that could be read
            out["caption_vector"] = np.full(len(batch["path"]), b"", dtype=object)
            captioned = [row for row in good if batch["caption"][row]]
            if captioned:
                texts = [str(batch["caption"][row]) for row in captioned]
                for row, vector in zip(captioned, self.encoder.embed_texts(texts), strict=True):
                    out["caption_vector"][row] = np.asarray(vector, dtype="<f4").tobytes()
        return out
