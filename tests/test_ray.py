"""Indexing on Ray: the same index as the plain path (a `clipseek index --ray` that starts and
stops a local Ray of its own); then, on one local Ray kept up for them (a run joins a Ray already
running), a model actor killed mid-run that Ray replaces, shards left by a killed ingest, a list
of URLs with broken ones (served on loopback), and WebDataset shards."""

import functools
import http.server
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
import ray

from indexer.config import ListSource, RaySettings
from indexer.demo_world import write_library
from indexer.pipeline import Indexer
from indexer.ray import pipeline as ray_pipeline
from indexer.ray import shards
from indexer.sources.pictures import walk
from indexer.store import Store

CLIPSEEK = str(Path(sys.executable).parent / "clipseek")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray") / "library"
    write_library(folder, count=40, seed=21)
    (folder / "broken.jpg").write_bytes(b"not a picture")
    return folder


@pytest.fixture(scope="module")
def running_ray(model_cache):
    """A local Ray for the in-process runs: started once, not once per run (some 10 s each)."""
    ray.init(
        num_cpus=max(os.cpu_count() or 1, RaySettings().workers + 1),
        runtime_env={"env_vars": {"CLIPSEEK_CACHE": str(model_cache)}},
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    yield
    ray.shutdown()


def rows_by_path(index: Path) -> dict:
    """Every picture of an index: its metadata and embedding, by path."""
    with Store.open(index) as store:
        images = store.catalog.images()
        rows = store.catalog.items_by_id([item.id for item in images.values()])
        return {
            path: (
                tuple(
                    getattr(rows[item.id], name)
                    for name in ("sha256", "size", "mtime_ns", "width", "height", "taken_at")
                ),
                store.catalog.embedding(item.id),
            )
            for path, item in images.items()
        }


def test_a_library_indexed_on_ray_equals_the_plain_path(tmp_path, library):
    with Indexer.open(tmp_path / "plain", model="demo") as indexer:
        indexer.index([library])
    run = subprocess.run(
        [CLIPSEEK, "index", library, "--model", "demo", "--ray", "--index", tmp_path / "ray"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "41 pictures in" in run.stderr and "40 embedded, 1 failed" in run.stderr
    # Ray Data's plan and progress reports stay in Ray's log files (they were some 20 lines on
    # stderr): what is left of Ray is at most its warning about token authentication and one line
    # from its core worker, before clipseek's summary.
    lines = run.stderr.splitlines()
    summary = next(number for number, line in enumerate(lines) if line.startswith("41 pictures in"))
    assert summary <= 2 and not any("\tINFO " in line for line in lines), run.stderr
    plain, on_ray = rows_by_path(tmp_path / "plain"), rows_by_path(tmp_path / "ray")
    assert set(plain) == set(on_ray) and len(plain) == 40
    for path, (metadata, vector) in plain.items():
        assert on_ray[path][0] == metadata
        assert float(on_ray[path][1] @ vector) >= 0.9999
    with Store.open(tmp_path / "ray") as store:
        assert store.check() == [] and not list(shards.shard_dir(store).glob("*"))  # every shard ingested
        assert [path for path, _ in store.catalog.failure_list()] == [str(library / "broken.jpg")]
    searched = [
        subprocess.run(
            [CLIPSEEK, "search", "a red circle", "--index", index, "--paths"], capture_output=True, text=True
        )
        for index in (tmp_path / "plain", tmp_path / "ray")
    ]
    assert searched[0].stdout == searched[1].stdout and searched[0].stdout.count("\n") == 10


@pytest.mark.usefixtures("running_ray")
def test_a_model_actor_killed_mid_run_is_replaced_and_the_index_is_complete(tmp_path, library):
    killed, done = [], threading.Event()

    def kill_the_actor() -> None:  # once it has loaded the model
        while not done.is_set() and not killed:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if title.startswith("ray::MapWorker(") and ".__init__" not in title:
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(title)
                    break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_actor)
    killer.start()
    try:
        with Indexer.open(tmp_path / "index", model="demo") as indexer:
            report = indexer.index([library], ray=RaySettings())
    finally:
        done.set()
        killer.join()
    assert killed, "the run ended before its model actor could be killed"
    assert (report.embedded, report.failed) == (40, 1)
    assert len(rows_by_path(tmp_path / "index")) == 40
    with Store.open(tmp_path / "index") as store:
        assert store.check() == []


@pytest.mark.usefixtures("running_ray")
def test_shards_left_by_a_killed_run_are_ingested_once(tmp_path, library):
    index = tmp_path / "index"
    with Indexer.open(index, model="demo") as indexer:  # embedded on Ray, killed before the ingest
        model = ray_pipeline.ModelSource(indexer.store.model_id, indexer.store.model_checkpoint)
        folder = shards.shard_dir(indexer.store)
        entries = list(walk([os.fsencode(library)]))
        ray_pipeline.embed(entries, model, indexer.encoder.preprocess, folder, RaySettings())
    written = sorted(folder.glob("*.parquet"))
    assert written
    spare = tmp_path / "spare.parquet"
    shutil.copy(written[0], spare)

    with Indexer.open(index) as indexer:  # the next run ingests them first: nothing is left to embed
        report = indexer.index([library], ray=RaySettings())
    assert (report.embedded, report.failed, report.unchanged) == (40, 1, 40)
    before = rows_by_path(index)

    # Killed between a shard's commit and its deletion; and a shard cut short while Ray wrote it.
    shutil.copy(spare, folder / "again.parquet")
    (folder / "cut.parquet").write_bytes(spare.read_bytes()[:200])
    with Indexer.open(index) as indexer:
        report = indexer.index([library], ray=RaySettings())
    assert (report.embedded, report.failed, report.unchanged) == (0, 0, 40)
    after = rows_by_path(index)
    assert set(after) == set(before) and all(np.array_equal(after[p][1], before[p][1]) for p in before)
    with Store.open(index) as store:
        assert store.check() == [] and not list(folder.glob("*"))


class _Pictures(http.server.SimpleHTTPRequestHandler):
    """The library over HTTP, plus a picture that never finishes arriving and one that is too large."""

    def do_GET(self):
        if self.path == "/slow.jpg":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\xff\xd8")
            time.sleep(4)  # past the fetch timeout: the download is given up, the run goes on
            return
        if self.path == "/huge.jpg":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\xff\xd8" + b"\0" * 300_000)  # no Content-Length: counted as it arrives
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def served(library):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Pictures, directory=library))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.usefixtures("running_ray")
def test_a_list_of_urls_with_broken_ones_records_the_failures_and_finishes(tmp_path, library, served):
    captions = [json.loads(line) for line in (library / "captions.jsonl").read_text().splitlines()][:8]
    rows = [{"URL": f"{served}/{row['image']}", "TEXT": row["caption"]} for row in captions]
    broken = {
        f"{served}/missing.jpg": "HTTP 404",
        f"{served}/captions.jsonl": "not a picture",
        f"{served}/slow.jpg": "timed out",
        f"{served}/huge.jpg": "larger than 200,000 bytes",
        "http://127.0.0.1:9/refused.jpg": "cannot fetch",
    }
    rows += [{"URL": url, "TEXT": "nothing to see"} for url in broken]
    listing = tmp_path / "laion-sample.parquet"
    pq.write_table(pa.Table.from_pylist(rows), listing)  # LAION's column names
    settings = RaySettings(fetch_timeout=1.0, fetch_max_bytes=200_000)
    with Indexer.open(tmp_path / "index", model="demo") as indexer:
        report = indexer.index_list(ListSource((str(listing),)), settings)
    assert (report.embedded, report.failed, report.captions) == (8, 5, 8)
    failures = dict(report.failures)
    assert set(failures) == set(broken) and all(broken[url] in failures[url] for url in broken)
    with Store.open(tmp_path / "index") as store:
        assert store.check() == [] and store.catalog.collections() == ["laion-sample"]
    engine_hits = subprocess.run(
        [CLIPSEEK, "search", captions[0]["caption"], "--index", tmp_path / "index", "-k", "1", "--paths"],
        capture_output=True,
        text=True,
    )
    assert engine_hits.stdout.strip() == rows[0]["URL"]
    with Indexer.open(tmp_path / "index") as indexer:  # again: nothing is fetched twice, failures included
        again = indexer.index_list(ListSource((str(listing),)), settings)
    assert (again.embedded, again.failed, again.captions) == (0, 0, 0)


@pytest.mark.usefixtures("running_ray")
def test_webdataset_shards_are_read_with_their_captions(tmp_path, library):
    pictures = sorted(library.rglob("*.jpg"))[:3]
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        members = [(f"s{n}.jpg", p.read_bytes()) for n, p in enumerate(pictures)] + [("s3.jpg", b"garbage")]
        members += [(f"s{n}.txt", f"caption {n}".encode()) for n in range(4)]
        for name, data in sorted(members):  # a sample's members side by side, as WebDataset wants
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with Indexer.open(tmp_path / "index", model="demo") as indexer:
        report = indexer.index_list(ListSource((str(shard),), collection="wds"), RaySettings())
    assert (report.embedded, report.failed, report.captions) == (3, 1, 3)
    assert report.failures[0][0] == f"{shard}#s3"
    with Store.open(tmp_path / "index") as store:
        assert sorted(store.catalog.images()) == [f"{shard}#s{n}".encode() for n in range(3)]
        assert store.catalog.captions("wds") == {"caption 0", "caption 1", "caption 2"}


@pytest.mark.usefixtures("running_ray")
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_csv_and_jsonl_lists_are_read_too(tmp_path, library, served, suffix):
    captions = [json.loads(line) for line in (library / "captions.jsonl").read_text().splitlines()][:4]
    rows = [{"image_url": f"{served}/{row['image']}", "caption": row["caption"]} for row in captions[:3]]
    local = library / captions[3]["image"]
    rows.append({"image_url": str(local), "caption": captions[3]["caption"]})  # a path, read from disk
    rows.append({"image_url": f"{served}/missing.png", "caption": "gone"})
    rows.append({"image_url": "", "caption": "a row without a picture is passed over"})
    listing = tmp_path / f"list{suffix}"
    if suffix == ".csv":
        pa.csv.write_csv(pa.Table.from_pylist(rows), listing)
    else:
        listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with Indexer.open(tmp_path / "index", model="demo") as indexer:
        report = indexer.index_list(ListSource((str(listing),), collection="listed"), RaySettings())
    assert (report.embedded, report.failed, report.captions) == (4, 1, 4)
    with Store.open(tmp_path / "index") as store:
        assert store.catalog.captions("listed") == {row["caption"] for row in captions}
        assert store.catalog.images()[str(local).encode()].size == local.stat().st_size
