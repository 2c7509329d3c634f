"""The query commands as a user runs them."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.demo_world import write_library

CLIPSEEK = str(Path(sys.executable).parent / "clipseek")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-search")
    write_library(root / "library", count=40, seed=8)
    env = {
        "CLIPSEEK_HOME": str(root / "home"),
        "CLIPSEEK_CACHE": os.environ["CLIPSEEK_CACHE"],
        "PATH": str(Path(sys.executable).parent),
    }
    subprocess.run([CLIPSEEK, "index", root / "library", "--model", "demo", "-q"], env=env, check=True)
    captions = ["add-captions", root / "library" / "captions.jsonl", "--collection", "demo"]
    subprocess.run([CLIPSEEK, *captions], env=env, check=True, capture_output=True)
    return root, env


def clipseek(home, *args):
    _, env = home
    return subprocess.run([CLIPSEEK, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def test_search_prints_a_table_of_scores_and_paths(home):
    result = clipseek(home, "search", "a large red circle", "-k", "3")
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    scores = [float(line.split()[0]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(line.split(maxsplit=1)[1]).is_file() for line in lines)


def test_paths_and_json_for_scripts(home):
    paths = clipseek(home, "search", "a blue star", "-k", "4", "--paths").stdout.splitlines()
    assert len(paths) == 4 and all(Path(p).is_file() for p in paths)
    document = json.loads(clipseek(home, "search", "a blue star", "-k", "4", "--json").stdout)
    assert [hit["path"] for hit in document["hits"]] == paths


def test_image_to_text_and_combined_queries(home):
    root, _ = home
    picture = next((root / "library").rglob("*.jpg"))
    captions = clipseek(home, "search", "--image", picture, "--texts", "-k", "2").stdout.splitlines()
    assert len(captions) == 2 and all("[demo] a " in line for line in captions)
    combined = clipseek(home, "search", "a circle", "--add", "red@2", "--subtract", "grass@0.5", "--json")
    assert combined.returncode == 0
    assert json.loads(combined.stdout)["query"] == "1·text('a circle') + 2·text('red') + -0.5·text('grass')"


def test_similar_and_classify(home):
    root, _ = home
    picture = next((root / "library").rglob("*.png"))
    similar = clipseek(home, "similar", picture, "--threshold", "0.99", "--paths")
    assert similar.stdout.splitlines()[0] == str(picture)
    classified = json.loads(clipseek(home, "classify", picture, "--labels", "circle,square,star", "--json").stdout)
    assert classified[0]["path"] == str(picture) and len(classified[0]["labels"]) == 3


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["search", ""], 1, "Error: empty query text"),
        (["search"], 2, "give a QUERY text"),
        (["search", "x", "-k", "0"], 1, "k must be at least 1"),
        (["search", "x", "--collection", "nope"], 1, "no collection 'nope'"),
        (["search", "--image", "/etc/hostname"], 1, "cannot read /etc/hostname"),
        (["search", "x", "--index", "/tmp/no/such/index"], 1, "no index at"),
        (["classify", "x.jpg", "--labels", "a,b", "--template", "no slot"], 2, "must contain {}"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_status(home, args, status, message):
    result = clipseek(home, *args)
    assert result.returncode == status and message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_absurd_k_is_capped_and_said(home):
    result = clipseek(home, "search", "x", "-k", "100000", "--paths")
    assert result.returncode == 0 and "k capped at 1000" in result.stderr
    assert len(result.stdout.splitlines()) == 40


def test_eval_reports_recall_in_both_directions(home):
    root, _ = home
    result = clipseek(home, "eval", root / "library" / "captions.jsonl", "--images", root / "library", "--json")
    figures = json.loads(result.stdout)
    assert figures["pairs"] == 40 and figures["model"].startswith("demo")
    for direction in ("text→image", "image→text"):
        r1, r5, r10 = (figures[f"{direction} R@{k}"] for k in (1, 5, 10))
        assert 0.5 <= r1 <= r5 <= r10 <= 1.0


def test_moved_weights_are_named_with_checkpoint(tmp_path):
    from indexer.models.identity import demo_checkpoint

    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(demo_checkpoint().read_bytes())
    write_library(tmp_path / "library", count=4, seed=2)
    home = (
        tmp_path,
        {
            "CLIPSEEK_HOME": str(tmp_path / "home"),
            "CLIPSEEK_CACHE": os.environ["CLIPSEEK_CACHE"],
            "PATH": str(Path(sys.executable).parent),
        },
    )
    assert (
        clipseek(home, "index", tmp_path / "library", "--model", "demo", "--checkpoint", weights, "-q").returncode == 0
    )
    moved = weights.rename(tmp_path / "elsewhere.safetensors")
    exported = clipseek(home, "search", "a red circle", "-k", "2", "--paths")  # the ONNX export needs no weights
    assert exported.returncode == 0 and len(exported.stdout.splitlines()) == 2
    torch_path = (tmp_path, {**home[1], "CLIPSEEK_BACKEND": "torch"})
    lost = clipseek(torch_path, "search", "a red circle")
    assert lost.returncode == 1 and "does not exist any more" in lost.stderr and "--checkpoint" in lost.stderr
    found = clipseek(torch_path, "search", "a red circle", "-k", "2", "--paths", "--checkpoint", moved)
    assert found.returncode == 0 and found.stdout == exported.stdout
    other = tmp_path / "other.safetensors"
    other.write_bytes(moved.read_bytes()[:-2] + b"  ")  # the same size, other bytes: not the index's model
    wrong = clipseek(home, "search", "a red circle", "--checkpoint", other)
    assert wrong.returncode == 1 and "made with" in wrong.stderr and "Traceback" not in wrong.stderr


def test_an_index_made_with_earlier_demo_weights_says_to_index_again(tmp_path):
    write_library(tmp_path / "library", count=4, seed=2)
    own_home = {"CLIPSEEK_HOME": str(tmp_path / "home"), "CLIPSEEK_CACHE": os.environ["CLIPSEEK_CACHE"]}
    home = (tmp_path, {**own_home, "PATH": str(Path(sys.executable).parent)})
    assert clipseek(home, "index", tmp_path / "library", "--model", "demo", "-q").returncode == 0
    # What an index made before the bundled weights changed holds: another sha256 for `demo`,
    # of which the model cache has no ONNX export (exports are kept by model identity).
    with sqlite3.connect(tmp_path / "home" / "indexes" / "default" / "catalog.sqlite") as catalog:
        (stored,) = catalog.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
        earlier = {**json.loads(stored), "checkpoint_sha256": "ed6aca4b92a5" + "0" * 52}
        catalog.execute("UPDATE meta SET value = ? WHERE key = 'model'", (json.dumps(earlier),))
    search = clipseek(home, "search", "a red circle")
    assert search.returncode == 1 and "Traceback" not in search.stderr
    assert "made with earlier weights of the bundled demo model (demo (sha256:ed6aca4b92a5" in search.stderr
    assert "index its pictures again, into a new index" in search.stderr
