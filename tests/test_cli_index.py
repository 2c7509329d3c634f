"""The index commands as a user runs them: subprocesses on a data directory in a tmp folder."""

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from indexer.demo_world import write_library
from tests.command_line import CLIPSEEK, clipseek


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSEEK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def three_hundred(tmp_path_factory) -> Path:
    """A library of 300 pictures (ten batches), long enough to stop a run in the middle; the tests
    index it, each into an index of its own, and leave it as it is."""
    library = tmp_path_factory.mktemp("three-hundred") / "library"
    write_library(library, count=300, seed=4)
    return library


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux's /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def item_count(index: Path) -> int:
    try:
        with sqlite3.connect(f"file:{index / 'catalog.sqlite'}?mode=ro", uri=True) as connection:
            return connection.execute("SELECT count(*) FROM items").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_index_status_check_remove(tmp_path, home):
    library = tmp_path / "library"
    write_library(library, count=30, seed=2)
    first = clipseek("index", library, "--model", "demo")
    said = first.stderr.splitlines()  # the model cache holds the export already (tests/conftest.py)
    # the rate and bottleneck, the summary: nothing about building empty vector files
    assert first.stdout == "" and len(said) == 2
    assert " pictures/s, decoded in " in said[0] and "; bottleneck: " in said[0]
    assert said[1].startswith("30 pictures in ") and said[1].endswith(" s: 30 embedded on cpu (ONNX Runtime)")

    report = json.loads(clipseek("index", library, "--json").stdout)
    assert (report["found"], report["unchanged"], report["embedded"]) == (30, 30, 0)

    clipseek("add-captions", library / "captions.jsonl", "--collection", "demo")
    status = json.loads(clipseek("status", "--json").stdout)
    assert status["path"] == str(home / "indexes" / "default")
    assert status["model"]["architecture"] == "demo"
    assert status["counts"] == [["image", None, 30], ["text", "demo", 30]]
    text = clipseek("status").stdout
    assert "30 images" in text and "30 texts in collection 'demo'" in text

    assert "ok" in clipseek("check").stderr
    (home / "indexes" / "default" / "image.faiss").write_bytes(b"garbage")
    broken = clipseek("check", check=False)
    assert broken.returncode == 1 and "image.faiss" in broken.stdout and "--repair" in broken.stderr
    clipseek("check", "--repair")
    clipseek("check")

    grass = sorted((library / "album-01" / "grass").iterdir())
    removed = clipseek("remove", library / "album-01" / "grass", grass[0]).stderr  # overlapping: counted once
    assert f"removed {len(grass)} items" in removed
    assert "removed 30 items" in clipseek("remove", "--collection", "demo").stderr
    assert json.loads(clipseek("status", "--json").stdout)["counts"] == [["image", None, 30 - len(grass)]]


def test_clear_errors(tmp_path, home):
    missing = clipseek("status", "--index", tmp_path / "nowhere", check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("Error: no index at")
    write_library(tmp_path / "library", count=2)
    clipseek("index", tmp_path / "library", "--model", "demo")
    other = clipseek("index", tmp_path / "library", "--model", "ViT-B-32", check=False)
    assert other.returncode == 1 and "made with demo" in other.stderr and "Traceback" not in other.stderr
    no_paths = clipseek("remove", check=False)
    assert no_paths.returncode == 2 and "name PATHS" in no_paths.stderr


@pytest.mark.slow
def test_a_second_writer_fails_fast_naming_the_first(three_hundred, home):
    index = home / "indexes" / "default"
    first = subprocess.Popen([CLIPSEEK, "index", three_hundred, "--model", "demo", "-q"], stderr=subprocess.PIPE)
    try:
        while item_count(index) == 0 and first.poll() is None:
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # held mid-run, however fast it would finish
        assert first.poll() is None and item_count(index) < 300
        second = clipseek("index", three_hundred, check=False)
        assert second.returncode == 1 and f"being written by process {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_items", [0, 64, 200])
def test_a_killed_run_loses_at_most_a_batch_and_a_rerun_completes(three_hundred, home, kill_after_items):
    library = three_hundred
    index = home / "indexes" / "default"
    run = subprocess.Popen([CLIPSEEK, "index", library, "--model", "demo", "-q"], stderr=subprocess.DEVNULL)
    while item_count(index) < kill_after_items and run.poll() is None:
        time.sleep(0.01)
    if kill_after_items == 0:
        time.sleep(1.0)  # somewhere in start-up
    decoders = children(run.pid)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    assert kill_after_items == 0 or decoders  # 300 pictures are decoded in processes
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in decoders) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in decoders), "the run's decoding processes outlived it"

    survived = item_count(index)
    if survived:  # the catalog reopens consistent, whatever the vector files say
        status = json.loads(clipseek("status", "--json").stdout)
        assert status["counts"] == [["image", None, survived]]
    rerun = json.loads(
        clipseek("index", library, "--json").stdout
        if survived
        else clipseek("index", library, "--model", "demo", "--json").stdout
    )
    assert rerun["embedded"] == 300 - survived and rerun["unchanged"] == survived
    assert item_count(index) == 300
    clipseek("check")


@pytest.mark.slow
def test_ctrl_c_stops_after_the_current_batch(three_hundred, home):
    library = three_hundred
    index = home / "indexes" / "default"
    run = subprocess.Popen([CLIPSEEK, "index", library, "--model", "demo", "-q"], stderr=subprocess.PIPE, text=True)
    while item_count(index) < 32 and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    kept = item_count(index)
    assert 32 <= kept < 300
    clipseek("check")  # what was committed is consistent and its vector files saved
    assert json.loads(clipseek("index", library, "--json").stdout)["embedded"] == 300 - kept
