"""The query path without torch: the same answers as torch, from a fresh process that never imports it,
and a damaged or foreign export made again rather than trusted."""

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from indexer.errors import ClipseekWarning
from indexer.models import backend
from indexer.models.identity import demo_checkpoint
from indexer.models.onnx_encoder import INT8_COSINE, INT8_PROBE_TEXTS, ExportBrokenError, OnnxEncoder
from indexer.sources.pictures import decode_image
from search.engine import Query, SearchEngine
from tests.http_server import demo_index

CLIPSEEK = str(Path(sys.executable).parent / "clipseek")
QUERIES = ["a red circle", "a small blue star on the left", "a large green cross over water", "a yellow square"]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return root, [Path(path) for path in demo_index(root, count=60, seed=41)]


def engines(index, monkeypatch):
    """The index opened twice: through the ONNX export, and through torch."""
    fast = SearchEngine.open(index)
    assert isinstance(fast.encoder, OnnxEncoder)
    monkeypatch.setenv("CLIPSEEK_BACKEND", "torch")
    slow = SearchEngine.open(index)
    assert not isinstance(slow.encoder, OnnxEncoder)
    monkeypatch.delenv("CLIPSEEK_BACKEND")
    return fast, slow


def test_queries_get_the_same_vectors_and_the_same_ids_in_the_same_order(indexed, own_cache, monkeypatch):
    """Through the float32 towers. Query texts take the int8 tower where the export measured it
    faithful, as it did for the demo model: their vectors stay within INT8_COSINE of torch's, but
    two pictures whose scores differ by less than its rounding may swap."""
    root, pictures = indexed
    queries = [*QUERIES, Query.image(pictures[0]), Query.text("a red star") - 0.5 * Query.image(pictures[1])]
    with SearchEngine.open(root / "index") as engine:
        assert engine.encoder.int8_towers == {"text"}
        rounded = [engine.embed(query) for query in queries]
    texts_in_float32(own_cache)
    fast, slow = engines(root / "index", monkeypatch)
    with fast, slow:
        for query, vector in zip(queries, rounded, strict=True):
            assert float(fast.embed(query) @ slow.embed(query)) >= 0.9999
            assert float(vector @ slow.embed(query)) >= INT8_COSINE
            for modality in ("image", "text"):
                assert [h.id for h in fast.search(query, k=10, modality=modality)] == [
                    h.id for h in slow.search(query, k=10, modality=modality)
                ]


def test_the_indexer_stores_what_torch_would_have_embedded(indexed, demo_encoder):
    root, pictures = indexed
    with SearchEngine.open(root / "index") as engine:
        ids, stored = engine.store.catalog.vectors("image")
        paths = {hit.id: hit.path for hit in engine.search("a picture", k=len(pictures))}
    images = [decode_image(paths[int(item)], demo_encoder.model_id.side).image for item in ids]
    cosines = (stored * demo_encoder.embed_images(images)).sum(axis=1)
    assert len(cosines) == len(pictures) and cosines.min() >= 0.9999


def test_int8_pictures_are_opt_in_and_close_to_float32(indexed, monkeypatch):
    root, pictures = indexed
    queries = [*QUERIES, Query.image(pictures[0]), Query.image(pictures[1])]
    with SearchEngine.open(root / "index") as engine:
        assert "image" not in engine.encoder.int8_towers
        expected = [engine.embed(query) for query in queries]
        best = [engine.search(query, k=1)[0].id for query in queries]
    monkeypatch.setenv("CLIPSEEK_BACKEND", "int8")
    assert backend.describe(engine.store.model_id).startswith("ONNX Runtime, int8 weights (")
    with SearchEngine.open(root / "index") as engine:
        assert engine.encoder.int8_towers == {"text", "image"}
        cosines = [float(engine.embed(query) @ vector) for query, vector in zip(queries, expected, strict=True)]
        assert min(cosines) >= 0.999 and max(cosines[-2:]) < 1 - 1e-7  # close, and really other weights
        assert [engine.search(query, k=1)[0].id for query in queries] == best


def test_query_texts_take_the_int8_tower_only_where_the_export_measured_it_faithful(indexed, own_cache):
    root, _ = indexed
    with SearchEngine.open(root / "index") as engine:
        model_id = engine.store.model_id
    texts = list(INT8_PROBE_TEXTS)
    float32 = OnnxEncoder(own_cache, model_id, int8="none").embed_texts(texts)
    int8 = OnnxEncoder(own_cache, model_id, int8="all").embed_texts(texts)
    recorded = json.loads((own_cache / "manifest.json").read_text())["text_int8"]["cosine"]
    assert recorded == pytest.approx((float32 * int8).sum(axis=1).min(), abs=1e-6) and recorded < 1 - 1e-6
    for cosine, towers, vectors, said in [
        (0.9995, {"text"}, int8, "texts through int8 weights (cosine ≥ 0.9995 to float32)"),
        (0.998, set(), float32, "texts in float32 (int8 weights reached only cosine 0.9980)"),
    ]:
        _edit_manifest(own_cache, lambda manifest, cosine=cosine: manifest["text_int8"].update(cosine=cosine))
        encoder = OnnxEncoder(own_cache, model_id)
        assert encoder.int8_towers == towers
        np.testing.assert_array_equal(encoder.embed_texts(texts), vectors)
        assert backend.describe(model_id).endswith(said)


def run_cli(*args, env=None):
    return subprocess.run([CLIPSEEK, *map(str, args)], capture_output=True, text=True, env=env)


# A command run in a fresh process, which then says which of torch's modules it imported.
WITH_IMPORTS = (
    "import sys; from search.cli.main import cli\n"
    "try: cli(sys.argv[1:])\n"
    "except SystemExit: pass\n"
    "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules), file=sys.stderr)"
)


def run_with_imports(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITH_IMPORTS, *map(str, args)], capture_output=True, text=True)


def test_a_cli_query_never_imports_torch_and_status_says_which_path(indexed):
    root, pictures = indexed
    for args in (["a red circle"], ["--image", pictures[0]], ["--image", pictures[0], "--texts"]):
        result = run_with_imports("search", *args, "--index", root / "index", "-k", "3")
        assert len(result.stdout.splitlines()) == 3 and result.stderr.strip().endswith("[]"), result.stderr
    status = run_cli("status", "--index", root / "index", "--json")
    assert json.loads(status.stdout)["runtime"].startswith("ONNX Runtime (")
    forced = run_cli("status", "--index", root / "index", env={**_env(), "CLIPSEEK_BACKEND": "torch"})
    assert "embeds     torch (CLIPSEEK_BACKEND=torch)" in forced.stdout


def test_a_new_index_of_an_exported_model_never_imports_torch(indexed, tmp_path):
    """Named by its architecture, or by a checkpoint file holding the same weights under another name."""
    root, _ = indexed
    renamed = tmp_path / "renamed.safetensors"
    shutil.copy(demo_checkpoint(), renamed)
    for name, weights in [("new", []), ("from-file", ["--checkpoint", renamed])]:
        result = run_with_imports("index", root / "library", "--model", "demo", *weights, "--index", tmp_path / name)
        assert result.stderr.strip().endswith("[]"), result.stderr
        assert "60 embedded on cpu (ONNX Runtime)" in result.stderr
        with SearchEngine.open(root / "index") as old, SearchEngine.open(tmp_path / name) as new:
            assert new.store.model_id == old.store.model_id
            for query in QUERIES:
                assert [h.path for h in new.search(query, k=10)] == [h.path for h in old.search(query, k=10)]


def _env():
    import os

    return dict(os.environ)


@pytest.fixture
def own_cache(monkeypatch, tmp_path, model_cache):
    """A model cache of this test's own, holding a copy of the demo model's export, to damage."""
    shared = backend.export_dir(backend.exported_model("demo", None, None))
    export = tmp_path / "cache" / "models" / shared.name
    shutil.copytree(shared, export)
    monkeypatch.setenv("CLIPSEEK_CACHE", str(tmp_path / "cache"))
    return export


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble(path: Path) -> None:  # the same size, other bytes: only the probe can tell
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _edit_manifest(export: Path, edit) -> None:
    manifest = json.loads((export / "manifest.json").read_text())
    edit(manifest)
    (export / "manifest.json").write_text(json.dumps(manifest))


def _foreign(export: Path) -> None:
    _edit_manifest(export, lambda manifest: manifest["model"].update(checkpoint_sha256="0" * 64))


def texts_in_float32(export: Path) -> None:
    """As an export whose int8 text tower was measured unfaithful: queries take the float32 one."""
    _edit_manifest(export, lambda manifest: manifest["text_int8"].update(cosine=0.0))


def _other_probe(export: Path) -> None:  # as if ONNX Runtime or the tokenizer no longer did what they did
    _edit_manifest(export, lambda manifest: manifest["text"].update(probe=[-x for x in manifest["text"]["probe"]]))


DAMAGES = {
    "truncated": (lambda export: _truncate(export / "text.onnx.data"), "missing or truncated"),
    "scrambled": (lambda export: _scramble(export / "text.onnx.data"), "damaged (checksum)"),
    "other-probe": (_other_probe, "no longer gives its probe vector"),
    "garbage": (lambda export: (export / "text.onnx").write_bytes(b"not a model"), "missing or truncated"),
    "no-manifest": (lambda export: (export / "manifest.json").unlink(), "no ONNX export at"),
    "another-model": (_foreign, "is of demo"),
}


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_or_foreign_export_gives_no_vector(indexed, own_cache, kind):
    """Each kind of damage is found before a vector is given; where the export cannot be made
    again (torch missing), that is an error that says what is wrong."""
    root, _ = indexed
    with SearchEngine.open(root / "index") as engine:
        model_id = engine.store.model_id
    texts_in_float32(own_cache)  # the tower damaged below is the one queries read
    damage, said = DAMAGES[kind]
    damage(own_cache)
    with pytest.raises(ExportBrokenError, match=re.escape(said)):
        OnnxEncoder(own_cache, model_id).embed_texts(["a red circle"])


# Made again from both places a damage is found: on opening the export (another model's), and
# while embedding (a tower's checksum).
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["scrambled", "another-model"])
def test_a_damaged_or_foreign_export_is_made_again_with_a_warning(indexed, own_cache, kind):
    root, _ = indexed
    with SearchEngine.open(root / "index") as engine:  # as the whole export answers, and so the made-again one
        expected = [hit.id for hit in engine.search("a red circle", k=10)]
    texts_in_float32(own_cache)  # the tower damaged below is the one queries read
    damage, warned = DAMAGES[kind]
    damage(own_cache)
    with warnings.catch_warnings(record=True) as caught, SearchEngine.open(root / "index") as engine:
        warnings.simplefilter("always")
        assert [hit.id for hit in engine.search("a red circle", k=10)] == expected
    messages = [str(w.message) for w in caught if issubclass(w.category, ClipseekWarning)]
    assert len(messages) == 1 and warned in messages[0] and "exporting it again" in messages[0]
    OnnxEncoder(own_cache, engine.store.model_id).embed_texts(["checked again"])  # whole again


def test_a_cli_user_sees_the_warning_as_one_line(indexed, own_cache):
    root, _ = indexed
    _scramble(own_cache / "image.onnx.data")
    result = run_cli("search", "--image", indexed[1][0], "--index", root / "index", "-k", "1", env=_env())
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1
    warning = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warning) == 1 and "image.onnx" in warning[0] and "exporting it again" in warning[0]
    assert "Traceback" not in result.stderr and "warnings.warn" not in result.stderr


def test_without_a_way_to_export_again_a_damaged_export_is_an_error_not_a_wrong_answer(indexed, own_cache):
    root, _ = indexed
    with SearchEngine.open(root / "index") as engine:
        model_id = engine.store.model_id
    texts_in_float32(own_cache)
    _scramble(own_cache / "text.onnx.data")
    encoder = OnnxEncoder(own_cache, model_id)  # as where torch is not installed: no rebuild
    with pytest.raises(ExportBrokenError, match="damaged"):
        encoder.embed_texts(["a red circle"])
    assert backend.describe(model_id).startswith("ONNX Runtime")  # the manifest itself is whole
