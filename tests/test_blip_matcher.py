"""BLIP's image-text matching as the matcher for real photos, proven at random initialisation: a
small BlipConfig (two layers of each tower, narrow, the real layer types) published in the hub's
layout by tests/hub_server.py on loopback, downloaded through the real code, and re-ranking a
demo index (the plumbing; its figures mean nothing at random weights)."""

import io
import json
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from indexer.errors import ModelError, QueryError
from indexer.models import hub
from indexer.models.matcher import BLIP_FILES, available_matchers, load_matcher
from search.cli.main import cli
from search.engine import Query, SearchEngine
from search.matching import reading_side
from tests.hf_tokenizer_files import bert
from tests.http_server import demo_index
from tests.hub_server import serving_hub

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = BLIP_FILES.repo
FOLDER = "models--Salesforce--blip-itm-base-coco"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the probe is closed


@pytest.fixture(scope="module")
def blip_repo(tmp_path_factory) -> dict[str, bytes]:
    """A BLIP ITM model at random weights, saved as transformers saves the real one, with a BERT
    WordPiece tokenizer built here and BLIP's image processor at the small model's side."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

    folder = bert(tmp_path_factory.mktemp("blip") / "repo")
    text = dict(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    text.update(max_position_embeddings=64, bos_token_id=2, pad_token_id=0, sep_token_id=3)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=48)
    torch.manual_seed(0)
    config = BlipConfig(text_config=text, vision_config={**vision, "patch_size": 16}, projection_dim=16)
    BlipForImageTextRetrieval(config).save_pretrained(folder)
    BlipImageProcessor(size={"height": 48, "width": 48}).save_pretrained(folder)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip-index")
    demo_index(root, count=12, seed=9)
    rows = map(json.loads, (root / "library" / "captions.jsonl").read_text(encoding="utf-8").splitlines())
    return root / "index", [(root / "library" / row["image"], row["caption"]) for row in rows]


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """The hub's cache in tmp_path, the network allowed."""
    for name in ("HF_HUB_OFFLINE", "CLIPSEEK_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_blip_downloads_once_and_gives_the_itm_heads_probabilities(blip_repo, hub_env, monkeypatch):
    """The matcher's pairing (the vision tower once per picture, each caption read against its
    picture's patches) gives what transformers' own forward pass gives, as the softmax of the ITM
    head; the download asks the hub once, then the cache answers."""
    assert available_matchers("ViT-B-32") == [] and available_matchers("demo") == ["demo"]
    with serving_hub({REPO: blip_repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        matcher = load_matcher("blip", "ViT-B-32")
        asked = len(server.requests)
        assert load_matcher("blip", "ViT-B-32") is matcher and len(server.requests) == asked
    snapshot = next((hub_env / FOLDER / "snapshots").iterdir())
    assert sorted(path.name for path in snapshot.iterdir()) == sorted(blip_repo)
    assert available_matchers("ViT-B-32") == ["blip"] and available_matchers("demo") == ["demo", "blip"]
    assert str(matcher).startswith("blip (sha256:") and matcher.image_side == 48

    from transformers import BlipForImageTextRetrieval, BlipProcessor

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (40 + 8 * n, 56, 3), np.uint8)) for n in range(3)]
    texts = ["a red circle on the left", "two dogs running on the beach at sunset", "a cat"]
    processor, model = BlipProcessor.from_pretrained(snapshot), BlipForImageTextRetrieval.from_pretrained(snapshot)
    with torch.no_grad():
        pairs = processor(images=[pictures[0]] * 3, text=texts, return_tensors="pt", padding=True)
        theirs = model.eval()(**pairs).itm_score.softmax(-1)[:, 1].numpy()
        single = processor(images=pictures, text=[texts[1]] * 3, return_tensors="pt", padding=True)
        theirs_single = model(**single).itm_score.softmax(-1)[:, 1].numpy()
    np.testing.assert_allclose(matcher.match([pictures[0]], texts), theirs, atol=1e-5)
    np.testing.assert_allclose(matcher.match(pictures, [texts[1]]), theirs_single, atol=1e-5)
    assert len(set(np.round(theirs, 6))) == 3  # three captions, three different answers: a real pass


def test_a_repository_without_safetensors_gives_its_pytorch_weights(blip_repo, hub_env, monkeypatch):
    """Where the repository holds PyTorch's file only, it is downloaded and read by torch's
    weights-only unpickler, with the same probabilities as the safetensors copy."""
    from safetensors.torch import load

    pickled = {name: data for name, data in blip_repo.items() if name != "model.safetensors"}
    buffer = io.BytesIO()
    torch.save(load(blip_repo["model.safetensors"]), buffer)
    pickled["pytorch_model.bin"] = buffer.getvalue()
    picture = Image.new("RGB", (60, 40), (200, 30, 30))
    with serving_hub({REPO: pickled}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        matcher = load_matcher("blip")
    assert hub.cached(BLIP_FILES).name == "pytorch_model.bin"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_env.parent / "other"))
    with serving_hub({REPO: blip_repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        safe = load_matcher("blip")
    assert hub.cached(BLIP_FILES).name == "model.safetensors" and safe is not matcher
    texts = ["a red square", "a cat"]
    np.testing.assert_allclose(matcher.match([picture], texts), safe.match([picture], texts), atol=1e-6)


def test_offline_or_unreachable_a_missing_blip_fails_at_once_with_what_to_do(hub_env, monkeypatch):
    started = time.monotonic()
    with pytest.raises(ModelError) as offline:
        load_matcher("blip", "ViT-B-32", offline=True)
    message = str(offline.value)
    assert "clipseek is offline" in message and "clipseek models fetch blip" in message and FOLDER in message
    assert "--checkpoint" not in message
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ModelError, match="cannot be reached"):
        load_matcher("blip", "ViT-B-32")
    assert time.monotonic() - started < 5
    assert not (hub_env / FOLDER / "snapshots").exists()
    with pytest.raises(QueryError, match="--matcher blip downloads BLIP's image-text matching model"):
        load_matcher("demo", "ViT-B-32")


def test_models_fetch_blip_and_damaged_weights_in_the_cache_are_refused(blip_repo, hub_env, monkeypatch):
    with serving_hub({REPO: blip_repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        fetched = CliRunner().invoke(cli, ["models", "fetch", "blip", "--json"])
    assert fetched.exit_code == 0, fetched.output
    document = json.loads(fetched.stdout)
    assert document["folder"] == str(hub_env / FOLDER) and document["model"] == BLIP_FILES.label
    assert hub.cached(BLIP_FILES) == Path(document["weights"])
    blob = Path(document["weights"]).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="not the ones the hub gave"):
        load_matcher("blip", offline=True)


def test_cli_reranks_with_blip_and_says_which_matcher(blip_repo, index, hub_env, monkeypatch):
    """`--matcher blip` downloads BLIP and shows both scores; then status, models and --json say so."""
    folder, pictures = index
    runner = CliRunner()
    path, text = pictures[0]
    with serving_hub({REPO: blip_repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        result = runner.invoke(
            cli, ["search", text, "-k", "4", "--rerank", "6", "--matcher", "blip", "--index", str(folder)]
        )
    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert header.startswith("cosine   match")
    rows = [re.fullmatch(r"\s*(-?[0-9.]+)\s+([0-9.]+)\s+(.+)", line).groups() for line in lines]
    assert len(rows) == 4 and all(0 <= float(match) <= 1 for _, match, _ in rows)
    with SearchEngine.open(folder, offline=True) as engine:  # the cache answers from now on
        hits = engine.search(text, k=6, rerank=6, matcher="blip")
        plain = engine.search(text, k=6)
        matcher = engine.matcher("blip")
        logits = matcher.match_logits([Image.open(hit.path) for hit in hits], [text])
        combined = matcher.rerank_logits(logits, np.array([hit.score for hit in hits]), engine.encoder.logit_scale)
        captions = engine.search(Query.image(path), k=3, modality="text", rerank=5, matcher="blip")
        caption_logits = matcher.match_logits(
            [engine.read_picture(path, reading_side(matcher))], [hit.caption for hit in captions]
        )
    assert {hit.id for hit in hits} == {hit.id for hit in plain}
    assert [hit.match for hit in captions] == pytest.approx(1 / (1 + np.exp(-caption_logits)), abs=1e-4)
    assert [hit.match for hit in hits] == pytest.approx(1 / (1 + np.exp(-logits)), abs=1e-4)
    assert list(np.argsort(-combined, kind="stable")) == list(range(6))
    assert [row[2] for row in rows] == [hit.path for hit in hits[:4]]

    status = runner.invoke(cli, ["status", "--index", str(folder), "--json"])
    assert json.loads(status.stdout)["matchers"] == ["demo", "blip"]
    listed = runner.invoke(cli, ["models", "--json"])
    matchers = {row["name"]: row for row in json.loads(listed.stdout)["matchers"]}
    assert matchers["blip"]["cached"] is True and matchers["blip"]["repo"] == REPO
    assert matchers["demo"]["cached"] is True and matchers["demo"]["for"] == "demo"
    table = runner.invoke(cli, ["models"])
    assert re.search(r"^  blip .*Salesforce/blip-itm-base-coco.*; 895 MB, cached$", table.stdout, re.M), table.stdout
