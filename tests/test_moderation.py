"""Moderation as a pipeline and a person use it: policies, verdicts on the demo world, blocklists, the CLI."""

import itertools
import json
import re
import threading
from dataclasses import fields

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from indexer.demo_world import LIBRARY_SIDES, VALUES, Scene, render, write_library
from indexer.errors import PolicyError, QueryError
from indexer.pipeline import Indexer
from search.cli.main import cli
from search.engine import SearchEngine
from search.moderation import Blocklist, Concept, Policy, Verdict, Weights
from tests.odd_pictures import huge_png

POLICY_YAML = """
weights: {image: 0.6, text: 0.4}
concepts:
  red triangles:
    prompts: ["a red triangle", "a picture of a red triangle"]
    threshold: 0.55
    review: 0.52
  green crosses:
    prompts: a green cross
    threshold: 0.7
    weights: {image: 1}
blocklists:
  known bad:
    path: known-bad
    action: review
"""
POLICY_JSON = """{
  "weights": {"image": 0.6, "text": 0.4},
  "concepts": {
    "red triangles": {"prompts": ["a red triangle", "a picture of a red triangle"], "threshold": 0.55, "review": 0.52},
    "green crosses": {"prompts": ["a green cross"], "threshold": 0.7, "weights": {"image": 1, "text": 0}}
  },
  "blocklists": {"known bad": {"path": "known-bad", "threshold": 0.95, "action": "review"}}
}"""

# Chosen from measurements on other renderings than the one tested (the grid of the `judged`
# fixture with seeds 0 and 2-11): with the first demo weights, red triangles scored 0.535-0.700,
# pictures of other colours at most 0.571, other red shapes up to 0.635. The current weights
# (data/train_demo.py's stage 7) give red triangles 0.591-0.684 there and other pictures at
# most 0.581 but for two small red stars at 0.617 and 0.623: block from 0.60, and the review
# band [0.55, 0.60) sends the close calls to a person.
RED_TRIANGLES_SETTINGS = {
    "prompts": ["a red triangle", "a picture of a red triangle"],
    "threshold": 0.6,
    "review": 0.55,
}
RED_TRIANGLES = Policy.from_dict({"concepts": {"red triangles": RED_TRIANGLES_SETTINGS}})
RED_TRIANGLE = {"colour": "red", "shape": "triangle"}  # the scenes that policy is about
BLOCKED_SCENE = Scene("star", "purple", "large", "centre", "sand")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A demo library and a known-bad folder holding one picture, indexed together."""
    root = tmp_path_factory.mktemp("moderation")
    pictures = write_library(root / "library", count=40, seed=31)
    assert all(picture.scene != BLOCKED_SCENE for picture in pictures)  # the library holds no copy of it
    (root / "known-bad").mkdir()
    blocked = root / "known-bad" / "blocked.png"
    render(BLOCKED_SCENE, 256, np.random.default_rng(4)).save(blocked)
    with Indexer.open(root / "index", model="demo") as indexer:
        indexer.index([root / "library", root / "known-bad"])
    return root, [root / "library" / picture.path for picture in pictures], blocked


@pytest.fixture(scope="module")
def engine(world):
    with SearchEngine.open(world[0] / "index") as engine:
        yield engine


# -- policies ------------------------------------------------------------------------------


def test_yaml_and_json_policies_are_the_same_policy(tmp_path):
    (tmp_path / "policy.yaml").write_text(POLICY_YAML)
    (tmp_path / "policy.json").write_text(POLICY_JSON)
    policy = Policy.load(tmp_path / "policy.yaml")
    assert policy == Policy.load(tmp_path / "policy.json")
    assert policy.concepts == (
        Concept("red triangles", ("a red triangle", "a picture of a red triangle"), 0.55, 0.52, Weights(0.6, 0.4)),
        Concept("green crosses", ("a green cross",), 0.7, None, Weights(1.0, 0.0)),
    )
    # A relative blocklist folder is relative to the policy file, so the two can move together.
    assert policy.blocklists == (Blocklist("known bad", str(tmp_path / "known-bad"), 0.95, "review"),)
    assert policy.prompts == ("a red triangle", "a picture of a red triangle", "a green cross")


def concept(**settings):
    return {"concepts": {"nudity": {"prompts": ["x"], "threshold": 0.6, **settings}}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "the policy is empty"),
        (None, "the policy is empty"),
        ({"concepts": {}, "blocklists": {}}, "the policy is empty"),
        ({"concept": {}}, "unknown key 'concept' \\(did you mean 'concepts'\\?\\)"),
        ({"concepts": ["a", "b"]}, "concepts must be a mapping of names to settings"),
        ({"concepts": {"nudity": {"threshold": 0.6}}}, 'concepts\\["nudity"\\].prompts is missing'),
        ({"concepts": {"nudity": {"prompts": ["x"]}}}, 'concepts\\["nudity"\\].threshold is missing'),
        (concept(prompts=[]), 'concepts\\["nudity"\\].prompts must be a list of one or more texts'),
        (concept(prompts=["x", " "]), 'concepts\\["nudity"\\].prompts must hold non-empty texts'),
        (concept(threshold="high"), 'concepts\\["nudity"\\].threshold must be a number from -1 to 1'),
        (concept(threshold=1.5), 'concepts\\["nudity"\\].threshold must be a number from -1 to 1, not 1.5'),
        (concept(threshold=True), 'concepts\\["nudity"\\].threshold must be a number'),
        (concept(threshold=float("nan")), 'concepts\\["nudity"\\].threshold must be a number'),
        (concept(review=0.7), 'concepts\\["nudity"\\].review \\(0.7\\) must be at most threshold \\(0.6\\)'),
        (concept(treshold=0.5), "concepts\\[\"nudity\"\\]: unknown key 'treshold' \\(did you mean 'threshold'\\?\\)"),
        (concept(weights={"image": -1}), 'concepts\\["nudity"\\].weights.image must be a number of 0 or more'),
        (
            concept(weights={"image": 0, "text": 0}),
            'concepts\\["nudity"\\].weights: at least one of image, text must be',
        ),
        ({**concept(), "weights": {"text": float("inf")}}, "weights.text must be a number of 0 or more"),
        ({**concept(), "weights": {"audio": 1}}, "weights: unknown key 'audio' \\(expected image, text\\)"),
        (
            concept(review=0.5, confirm="albef"),
            "concepts\\[\"nudity\"\\].confirm must be true or a matcher \\(demo, blip\\), not 'albef'",
        ),
        (concept(confirm=True), 'concepts\\["nudity"\\].confirm re-scores the review band: give review too'),
        ({"blocklists": {"bad": {}}}, 'blocklists\\["bad"\\].path is missing'),
        ({"blocklists": {"bad": {"path": 3}}}, 'blocklists\\["bad"\\].path must be a folder or a glob'),
        ({"blocklists": {"bad": {"path": "bad/"}}}, 'blocklists\\["bad"\\].path must be an absolute folder or a glob'),
        ({"blocklists": {"bad": {"path": "/b", "threshold": 2}}}, 'blocklists\\["bad"\\].threshold must be a number'),
        (
            {"blocklists": {"bad": {"path": "/b", "action": "delete"}}},
            "blocklists\\[\"bad\"\\].action must be block or review, not 'delete'",
        ),
    ],
)
def test_malformed_policies_name_the_field(data, message):
    with pytest.raises(PolicyError, match=f"^policy: {message}"):
        Policy.from_dict(data)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("policy.yaml", "concepts:\n  x: [unclosed\n", "policy.yaml is not valid YAML at line 3, column 1"),
        ("policy.json", '{"concepts": {\n  "x": }\n}', "policy.json is not valid JSON at line 2, column 8"),
        ("policy.yml", "", "policy.yml: the policy is empty"),
        ("policy.yaml", "concepts:\n  x:\n    prompts: [a]\n", 'policy.yaml: concepts\\["x"\\].threshold is missing'),
        ("policy.yaml", b"\xff\xfe", "cannot read policy file .*policy.yaml"),
    ],
)
def test_unreadable_policy_files_say_where(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(PolicyError, match=message):
        Policy.load(path)
    with pytest.raises(PolicyError, match=r"policy file .*nowhere.yaml does not exist"):
        Policy.load(tmp_path / "nowhere.yaml")


# -- concepts on the demo world ------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered():
    """Every scene of the demo world (colour × shape × position × background) at both sizes,
    rendered with seed 1: 1,200 scenes and pictures."""
    rng = np.random.default_rng(1)
    scenes = [Scene(*values) for values in itertools.product(*(VALUES[field.name] for field in fields(Scene)))]
    return scenes, [render(scene, int(rng.choice(LIBRARY_SIDES)), rng) for scene in scenes]


@pytest.fixture(scope="module")
def judged(engine, rendered):
    """The rendered scenes judged by the red-triangle policy: 1,200 (scene, verdict) pairs."""
    scenes, images = rendered
    return list(zip(scenes, engine.moderate_many([(image, None) for image in images], RED_TRIANGLES), strict=True))


def test_red_triangles_are_blocked_and_everything_else_is_not(judged):
    red_triangles = [verdict for scene, verdict in judged if scene.matches(RED_TRIANGLE)]
    assert len(red_triangles) == 40 and "allow" not in {verdict.decision for verdict in red_triangles}
    blocked = [verdict for verdict in red_triangles if verdict.decision == "block"]
    assert len(blocked) >= 38  # 39 here (the last, at 0.554, goes to review); 478 of 480 over twelve renderings
    reason = re.compile(r"red triangles: 0\.\d{3} ≥ block threshold 0\.6 \(image 0\.\d{3}\)")
    assert all(reason.fullmatch(verdict.reasons[0]) for verdict in blocked)
    others = [(scene, verdict.decision) for scene, verdict in judged if not scene.matches(RED_TRIANGLE)]
    assert len(others) == 1160 and "block" not in {decision for _, decision in others}
    # Close calls go to a person: here two small red stars (0.582 and 0.559).
    reviewed = [scene for scene, decision in others if decision == "review"]
    assert len(reviewed) <= 4 and all(scene.colour == "red" and scene.size == "small" for scene in reviewed)


def test_a_matcher_confirms_or_rejects_what_falls_in_the_review_band(engine, rendered, judged):
    """A review band wide enough to hold 50 or so pictures of the 1,200, re-scored by the demo
    matcher with the concept's prompts: each goes to block or allow, the record says which matcher
    decided and its probability. The demo matcher reads colour from so short a prompt better than
    shape: with the committed weights red triangles are confirmed and 16 of the band's 17 triangles
    of other colours rejected (a large purple one over water is taken for red, 0.665), but 2 of its
    10 red shapes of other kinds are confirmed too."""
    scenes, images = rendered
    settings = {**RED_TRIANGLES_SETTINGS, "review": 0.5}
    band = [n for n, (_, verdict) in enumerate(judged) if 0.5 <= verdict.concepts[0].score < 0.6]
    confirming = Policy.from_dict({"concepts": {"red triangles": {**settings, "confirm": "demo"}}})
    assert confirming.concepts[0].confirm == "demo"
    verdicts = engine.moderate_many([(images[n], None) for n in band], confirming)
    assert len(band) >= 20 and {verdict.decision for verdict in verdicts} == {"block", "allow"}
    reason = re.compile(
        r"red triangles: 0\.\d{3} in the review band \[0\.5, 0\.6\) \(image 0\.\d{3}\), "
        r"(confirmed|rejected) by the demo matcher \((0\.\d{3}) (≥|<) 0\.5\)"
    )
    for verdict in verdicts:
        score, (said,) = verdict.concepts[0], verdict.reasons
        verb, probability, _ = reason.fullmatch(said).groups()
        assert score.matcher == "demo" and f"{score.match:.3f}" == probability
        assert verb == ("confirmed" if verdict.decision == "block" else "rejected") and score.action == verdict.decision
        assert (score.match >= 0.5) == (verdict.decision == "block")
    decided = [(scenes[n], verdict.decision) for n, verdict in zip(band, verdicts, strict=True)]
    red_triangles, other_colours, other_shapes = (
        [decision for scene, decision in decided if (scene.colour == "red", scene.shape == "triangle") == kind]
        for kind in ((True, True), (False, True), (True, False))
    )
    assert red_triangles and set(red_triangles) == {"block"}
    assert len(other_colours) >= 10 and other_colours.count("block") <= len(other_colours) // 10
    assert len(other_shapes) >= 5 and other_shapes.count("block") <= len(other_shapes) // 2
    # outside the band nothing changes, and a text alone stays in review: the matcher reads pictures
    outside = [n for n in range(len(images)) if n not in band][::10]
    after = engine.moderate_many([(images[n], None) for n in outside], confirming)
    assert [v.decision for v in after] == [judged[n][1].decision for n in outside]
    assert all(v.concepts[0].matcher is None for v in after)
    text_policy = Policy.from_dict(
        {"concepts": {"red": {"prompts": "a red triangle", "threshold": 1, "review": 0, "confirm": True}}}
    )
    alone = engine.moderate(text="red triangles for sale", policy=text_policy)
    assert alone.decision == "review" and alone.concepts[0].matcher is None


def neutral_picture() -> Image.Image:
    return render(Scene("circle", "blue", "large", "centre", "water"), 256, np.random.default_rng(5))


def test_text_that_comes_with_a_picture_is_fused_with_it(engine):
    picture = neutral_picture()
    alone = engine.moderate(image=picture, policy=RED_TRIANGLES).concepts[0]
    both = engine.moderate(image=picture, text="a red triangle", policy=RED_TRIANGLES).concepts[0]
    assert alone.text is None and alone.score == alone.image < 0.3 and alone.action == "allow"
    assert both.image == pytest.approx(alone.image, abs=1e-6) and both.text == pytest.approx(1, abs=1e-6)
    assert both.score == pytest.approx(0.5 * both.image + 0.5 * both.text) and both.score > alone.score
    pictures_only = Policy.from_dict(
        {"concepts": {"red triangles": {**RED_TRIANGLES_SETTINGS, "weights": {"image": 1}}}}
    )
    assert engine.moderate(image=picture, text="a red triangle", policy=pictures_only).concepts[0].score == alone.image


def test_a_text_alone_is_judged_by_the_text(engine):
    verdict = engine.moderate(text="a red triangle", policy=RED_TRIANGLES)
    assert verdict.decision == "block" and verdict.concepts[0].image is None
    assert verdict.reasons == ("red triangles: 1.000 ≥ block threshold 0.6 (text 1.000)",)
    assert engine.moderate(text="a blue circle on water", policy=RED_TRIANGLES).decision == "allow"
    with pytest.raises(QueryError, match="nothing to moderate: give an image, a text or both"):
        engine.moderate(text=" ", policy=RED_TRIANGLES)


# -- blocklists ----------------------------------------------------------------------------


def test_a_reencoded_resized_copy_of_a_blocked_picture_is_blocked(tmp_path, engine, world):
    root, library, blocked = world
    # The default threshold (0.95): copies score 0.999 or more, the library's pictures at most 0.67.
    policy = Policy.from_dict({"blocklists": {"known bad": {"path": str(root / "known-bad")}}})
    copy = tmp_path / "upload.jpg"
    with Image.open(blocked) as image:
        image.resize((round(image.width * 0.7), round(image.height * 0.7))).convert("RGB").save(copy, quality=60)
    verdict = engine.moderate(image=copy, policy=policy)
    assert verdict.decision == "block" and len(verdict.matches) == 1
    match = verdict.matches[0]
    assert match.path == str(blocked) and match.similarity >= 0.99  # 0.999 with the committed weights
    assert verdict.reasons == (f"looks like 'known bad' item {match.id} {blocked} ({match.similarity:.3f})",)
    others = engine.moderate_many([(picture, None) for picture in library], policy)
    assert [verdict.decision for verdict in others] == ["allow"] * len(library)


# -- batches, threads, results -------------------------------------------------------------


def test_a_batch_gives_the_verdicts_of_one_at_a_time(engine, world):
    _, library, blocked = world
    blocklists = {"known bad": {"path": str(blocked.parent)}}
    policy = Policy.from_dict({"concepts": {"red triangles": RED_TRIANGLES_SETTINGS}, "blocklists": blocklists})
    item = engine.search(blocked, k=1)[0].id
    items = [
        (library[0], None),
        (None, "a red triangle"),
        (library[1].read_bytes(), "a large blue star"),
        (item, None),
        (neutral_picture(), "a picture of a red triangle"),
    ]
    batch = engine.moderate_many(items, policy)
    for (image, text), together in zip(items, batch, strict=True):
        alone = engine.moderate(image=image, text=text, policy=policy)
        assert (together.decision, together.reasons, together.matches) == (alone.decision, alone.reasons, alone.matches)
        for a, b in zip(together.concepts, alone.concepts, strict=True):
            assert (a.image, a.text, a.score) == pytest.approx((b.image, b.text, b.score), abs=1e-5)
    assert batch[1].decision == "block" and batch[3].decision == "block" and batch[3].matches[0].similarity > 0.999
    with pytest.raises(QueryError, match="item 2 of 2: nothing to moderate"):
        engine.moderate_many([(library[0], None), (None, None)], policy)


def test_one_engine_moderates_from_many_threads(engine, world):
    root, library, _ = world
    items = [(picture, None) for picture in library[:4]]
    policies = [RED_TRIANGLES, Policy.from_dict(concept()), Policy.from_dict(concept(prompts=["a star", "a cross"]))]
    expected = [[verdict.decision for verdict in engine.moderate_many(items, policy)] for policy in policies]
    results, errors = {}, []
    with SearchEngine.open(root / "index") as fresh:  # no prompts cached yet: the threads race to embed them

        def judge(number):
            try:
                results[number] = [verdict.decision for verdict in fresh.moderate_many(items, policies[number % 3])]
            except Exception as error:  # collected and reported below
                errors.append(error)

        threads = [threading.Thread(target=judge, args=(number,)) for number in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert fresh.embed_prompts(RED_TRIANGLES.prompts) is fresh.embed_prompts(RED_TRIANGLES.prompts)
    assert not errors
    assert results == {number: expected[number % 3] for number in range(12)}


def test_a_verdict_is_json(engine):
    verdict = engine.moderate(image=neutral_picture(), text="a red triangle", policy=RED_TRIANGLES)
    assert isinstance(verdict, Verdict)
    document = json.loads(json.dumps(verdict.to_dict()))
    assert set(document) == {"decision", "reasons", "concepts", "matches"}
    assert document["concepts"][0]["concept"] == "red triangles" and document["concepts"][0]["text"] > 0.99


# -- the command ---------------------------------------------------------------------------


@pytest.fixture
def policy_file(tmp_path, world):
    root, _, _ = world
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_YAML.replace("path: known-bad", f"path: {root / 'known-bad'}"))
    return path


def moderate(world, *args):
    return CliRunner().invoke(cli, ["moderate", *map(str, args), "--index", str(world[0] / "index")])


def test_moderate_prints_one_line_per_picture(tmp_path, world, policy_file):
    _, _, blocked = world
    triangle = tmp_path / "triangle.png"
    render(Scene("triangle", "red", "large", "left", "grass"), 256, np.random.default_rng(6)).save(triangle)
    calm = tmp_path / "calm.png"
    neutral_picture().save(calm)
    result = moderate(world, blocked, calm, triangle, "--policy", policy_file)
    assert result.exit_code == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    # The policy file asks for review, not a block, on a blocklist match.
    assert re.fullmatch(rf"review  {blocked}  looks like 'known bad' item \d+ {blocked} \(1\.000\)", lines[0])
    assert lines[1] == f"allow   {calm}"
    assert re.fullmatch(
        rf"block   {triangle}  red triangles: 0\.\d{{3}} ≥ block threshold 0\.55 \(image .*\)", lines[2]
    )
    text_only = moderate(world, "--text", "a red triangle", "--policy", policy_file)
    assert text_only.exit_code == 0 and text_only.stdout.startswith('block   "a red triangle"  red triangles: 1.000')


def test_moderate_json_for_scripts(world, policy_file):
    _, library, _ = world
    result = moderate(world, library[0], library[1], "--text", "a red triangle", "--policy", policy_file, "--json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["policy"] == str(policy_file)
    assert [(r["image"], r["text"]) for r in document["results"]] == [(str(p), "a red triangle") for p in library[:2]]
    for entry in document["results"]:
        assert entry["decision"] in ("allow", "review", "block")
        assert [c["concept"] for c in entry["concepts"]] == ["red triangles", "green crosses"]
        assert entry["concepts"][0]["text"] == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (
            "concepts:\n  red triangles:\n    prompts: [a]\n    threshold: high\n",
            'concepts\\["red triangles"\\].threshold must',
        ),
        ("concepts:\n  red triangles: [a\n", "is not valid YAML at line 3"),
        (None, "policy file .*missing.yaml does not exist"),
    ],
)
def test_a_bad_policy_is_one_line_and_exit_status_1(tmp_path, world, policy, message):
    path = tmp_path / ("policy.yaml" if policy else "missing.yaml")
    if policy:
        path.write_text(policy)
    result = moderate(world, world[1][0], "--policy", path)
    assert result.exit_code == 1 and result.stdout == ""
    assert re.fullmatch(f"Error: .*{message}.*\n", result.stderr) and "Traceback" not in result.stderr


def test_moderate_without_pictures_or_text_is_a_usage_error(world, policy_file):
    result = moderate(world, "--policy", policy_file)
    assert result.exit_code == 2 and "give PICTURES, --text TEXT or both" in result.stderr


def test_a_picture_over_the_pixel_budget_is_an_error_naming_both(tmp_path, world, policy_file):
    huge = tmp_path / "huge.png"
    huge.write_bytes(huge_png(12_000, 12_000))
    result = moderate(world, world[1][0], huge, "--policy", policy_file)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        f"Error: {huge}: 12000 × 12000 pixels (144 MP) is over the pixel budget of 50 MP (--max-pixels sets it)\n"
    )
    wide = tmp_path / "wide.png"
    wide.write_bytes(huge_png(2_000, 1_000))
    refused = moderate(world, wide, "--policy", policy_file, "--max-pixels", "1.5M")
    assert refused.exit_code == 1 and "2000 × 1000 pixels (2 MP) is over the pixel budget of 1.5 MP" in refused.stderr
    allowed = moderate(world, wide, "--policy", policy_file, "--max-pixels", "2000x1000", "--json")
    assert allowed.exit_code == 0 and len(json.loads(allowed.stdout)["results"]) == 1
    assert moderate(world, wide, "--policy", policy_file, "--max-pixels", "lots").exit_code == 2
