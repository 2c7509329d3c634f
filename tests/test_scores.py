"""Scores across model families: a model trained with SigLIP's sigmoid loss has a cosine of its
own from which it sees a text and a picture as a match, recorded with its export, and
`--min-score match` filters on it; a model trained with CLIP's softmax has none, and says so.

The sigmoid model is NLLB-SigLIP's real architecture at random weights (tests/hf_text_towers.py)
with its learned bias set so that its even odds fall among the query's scores."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from indexer.demo_world import write_library
from indexer.errors import QueryError
from indexer.models.encoder import load_encoder
from indexer.models.onnx_encoder import OnnxEncoder
from indexer.pipeline import Indexer
from search.cli.main import cli
from search.engine import Query, SearchEngine
from tests.hf_text_towers import register

QUERY = "一个红色的圆"


@pytest.fixture(scope="module")
def sigmoid_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("sigmoid")
    library = root / "library"
    pictures = write_library(library, count=12, seed=5)
    (root / "model").mkdir()
    name = register(root / "model", "nllb-clip-base-siglip", "tiny")
    encoder = load_encoder(name, "random")
    images = [Image.open(library / picture.path).convert("RGB") for picture in pictures]
    scores = (encoder.embed_texts([QUERY]) @ encoder.embed_images(images).T)[0]
    middle = float(np.median(scores))
    state = encoder.model.state_dict()
    state["logit_bias"] = torch.full_like(state["logit_bias"], -encoder.logit_scale * middle)
    weights = root / "weights.pt"
    torch.save(state, weights)
    with Indexer.open(root / "index", model=name, checkpoint=weights) as indexer:
        indexer.index([library])
    return root / "index", middle


def test_match_filters_on_the_models_own_even_odds(sigmoid_index):
    index, middle = sigmoid_index
    with SearchEngine.open(index) as engine:
        scale = engine.score_scale
        assert isinstance(engine.encoder, OnnxEncoder), "the scale is read from the export, without torch"
        assert scale.family == "sigmoid" and scale.match_cosine == pytest.approx(middle, abs=1e-5)
        everything = engine.search(QUERY, k=12)
        matches = engine.search(QUERY, k=12, min_score="match")
    assert 0 < len(matches) < len(everything) == 12
    assert [hit.id for hit in matches] == [hit.id for hit in everything if hit.score >= scale.match_cosine]
    assert min(scale.match_probability(hit.score) for hit in matches) >= 0.5
    assert max(scale.match_probability(hit.score) for hit in everything[len(matches) :]) < 0.5


def test_the_command_line_takes_match_as_a_minimum_score(sigmoid_index):
    index, _ = sigmoid_index
    runner = CliRunner()
    result = runner.invoke(cli, ["search", QUERY, "--index", str(index), "--min-score", "match", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["hits"]
    with SearchEngine.open(index) as engine:
        assert [hit["id"] for hit in hits] == [hit.id for hit in engine.search(QUERY, min_score="match")]
    refused = runner.invoke(cli, ["search", QUERY, "--index", str(index), "--min-score", "likely"])
    assert refused.exit_code == 2 and "'likely' is neither a number nor 'match'" in refused.output


def test_match_is_refused_where_the_model_does_not_judge_the_pair(sigmoid_index, tmp_path):
    with SearchEngine.open(sigmoid_index[0]) as engine, pytest.raises(QueryError, match="for a text against pictures"):
        engine.search(Query.text(QUERY), modality="text", min_score="match")
    write_library(tmp_path / "library", count=4, seed=1)
    with Indexer.open(tmp_path / "index", model="demo") as indexer:
        indexer.index([tmp_path / "library"])
    with SearchEngine.open(tmp_path / "index") as engine:
        assert engine.score_scale.family == "softmax" and engine.score_scale.match_cosine is None
        with pytest.raises(QueryError, match="trained with CLIP's softmax loss: its scores rank results"):
            engine.search("a red circle", min_score="match")
