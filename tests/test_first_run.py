"""A user's first run: the model's weights download once with a progress bar; offline or with the
hub unreachable, the run fails at once, before torch, with what to do, and leaves no index behind.

The hub is tests/hub_server.py on 127.0.0.1, serving the bundled demo model as the open_clip hub
model `hf-hub:clipseek-test/demo` through the real download code (huggingface_hub)."""

import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from indexer.demo_world import write_library
from indexer.errors import ModelError
from indexer.models import hub
from indexer.models.choices import CHOICES
from indexer.models.identity import demo_checkpoint, sha256_file
from search.cli.main import cli
from tests.hf_tokenizer_files import siglip_t5
from tests.hub_server import DEMO_REPO, serving_hub

CLIPSEEK = str(Path(sys.executable).parent / "clipseek")
HUB_MODEL = f"hf-hub:{DEMO_REPO}"
DEFAULT_FOLDER = "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's environment with the hub's cache and clipseek's data in tmp_path."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "CLIPSEEK_OFFLINE", "HF_ENDPOINT")}
    return {**env, "HF_HUB_CACHE": str(tmp_path / "hf"), "CLIPSEEK_HOME": str(tmp_path / "home"), **extra}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the probe is closed


def _run_in_a_terminal(command: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """Run a command with stdout and stderr on a pseudo-terminal (120 columns), as a user sees it."""
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the command has exited
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(leader)
    return process.wait(timeout=10), output.decode(errors="replace")


def test_listed_models_agree_with_open_clip():
    import open_clip

    for choice in CHOICES:
        config = open_clip.get_pretrained_cfg(choice.architecture, choice.pretrained)
        assert config["hf_hub"].rstrip("/") == choice.hf_repo, choice.name
        model = open_clip.get_model_config(choice.architecture)
        assert model["embed_dim"] == choice.dim, choice.name
        assert model["vision_cfg"]["image_size"] == choice.image_size, choice.name
    assert CHOICES[0].name == "ViT-B-32/laion2b_s34b_b79k" and CHOICES[0].imagenet_top1 == 66.56


@pytest.mark.slow
def test_first_index_downloads_the_model_once_with_a_progress_bar(tmp_path):
    write_library(tmp_path / "library", count=6, seed=3)
    with serving_hub() as server:
        env = _env(tmp_path, HF_ENDPOINT=server.url)
        code, output = _run_in_a_terminal([CLIPSEEK, "index", str(tmp_path / "library"), "--model", HUB_MODEL], env)
        assert code == 0, output
        downloads = [line for line in server.requests if line.startswith("GET") and "/resolve/" in line]
    # The hub's bar, with the size and the rate, then the run's own summary.
    assert "open_clip_model.safetensors" in output
    assert "2.96M/2.96M" in output and "B/s" in output
    assert f"downloading {HUB_MODEL} (3 MB)" in output
    assert "6 pictures" in output and "6 embedded" in output
    assert [line.rsplit("/", 1)[1] for line in downloads] == [  # each once; the weights last
        "open_clip_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "open_clip_model.safetensors",
    ]
    weights = hub.cached(hub.files_for(HUB_MODEL, None), tmp_path / "hf")
    assert weights is not None and sha256_file(weights) == sha256_file(demo_checkpoint())


def test_a_cut_download_leaves_nothing_in_the_cache_and_a_rerun_succeeds(tmp_path, monkeypatch, demo_encoder):
    from indexer.models.encoder import load_encoder

    cache = tmp_path / "hf"
    files = hub.files_for(HUB_MODEL, None)
    with serving_hub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.cut = "open_clip_model.safetensors"
        with pytest.raises(ModelError, match=r"download of hf-hub:clipseek-test/demo failed.*run the command again"):
            load_encoder(HUB_MODEL, cache_dir=str(cache))
        assert hub.cached(files, cache) is None
        assert not list(cache.rglob("snapshots/*/open_clip_model.safetensors"))

        server.cut = None
        encoder = load_encoder(HUB_MODEL, cache_dir=str(cache))
    assert encoder.model_id.checkpoint_sha256 == sha256_file(demo_checkpoint())
    texts = ["a small red circle on the left", "一个蓝色的正方形"]
    np.testing.assert_allclose(encoder.embed_texts(texts), demo_encoder.embed_texts(texts), atol=1e-6)


def test_an_unreachable_hub_fails_within_seconds_with_what_to_do(tmp_path):
    (tmp_path / "library").mkdir()
    env = _env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    result = subprocess.run(
        [CLIPSEEK, "index", str(tmp_path / "library")], env=env, capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 1 and elapsed < 5, (elapsed, result.stderr)
    message = result.stderr.strip()
    assert message.startswith("Error: the weights") and "\n" not in message, message  # one message, no retry noise
    for part in (
        "ViT-B-32 / laion2b_s34b_b79k",
        "cannot be reached",
        "Connection refused",
        "clipseek models fetch ViT-B-32 --pretrained laion2b_s34b_b79k",
        f"copy the folder {DEFAULT_FOLDER}",
        f"into {tmp_path / 'hf'}",
        "--checkpoint FILE",
    ):
        assert part in message
    assert not (tmp_path / "home" / "indexes" / "default").exists()  # no half-made index


OFFLINE_SCRIPT = """
import json, sys, time
from search.cli.main import cli
start = time.monotonic()
try:
    cli.main(sys.argv[1:], prog_name="clipseek", standalone_mode=False)
    message = None
except Exception as error:
    message = str(error)
print(json.dumps({"message": message, "seconds": time.monotonic() - start, "torch": "torch" in sys.modules,
                  "open_clip": "open_clip" in sys.modules}))
"""


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--offline"], {}, "clipseek is offline"),
        ([], {"CLIPSEEK_OFFLINE": "1"}, "clipseek is offline"),
        ([], {"HF_HUB_OFFLINE": "1"}, "clipseek is offline"),
        (["--checkpoint", "no-such-weights.safetensors"], {}, "checkpoint no-such-weights.safetensors does not exist"),
    ],
)
def test_a_first_run_that_cannot_get_the_model_fails_before_importing_torch(tmp_path, args, env, expected):
    (tmp_path / "library").mkdir()
    index = tmp_path / "home" / "indexes" / "photos"
    command = [sys.executable, "-c", OFFLINE_SCRIPT, "index", str(tmp_path / "library"), "--index", "photos", *args]
    start = time.monotonic()
    result = subprocess.run(command, env=_env(tmp_path, **env), capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    report = json.loads(result.stdout)
    assert expected in report["message"]
    assert not report["torch"] and not report["open_clip"]
    assert elapsed < 5, elapsed  # the whole process, Python's start included
    assert not index.exists()
    if "offline" in expected:
        assert "clipseek models fetch ViT-B-32" in report["message"] and DEFAULT_FOLDER in report["message"]
        assert "--checkpoint FILE" in report["message"]


def test_models_lists_the_choices_and_fetch_caches_one_for_offline_use(tmp_path):
    runner = CliRunner()
    env = _env(tmp_path)
    listed = runner.invoke(cli, ["models", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    rows = {(row["model"], row["pretrained"]): row for row in json.loads(listed.stdout)["models"]}
    default = rows["ViT-B-32", "laion2b_s34b_b79k"]
    assert default["role"] == "default" and default["imagenet_top1"] == 66.56 and default["dim"] == 512
    assert default["cached"] is False and default["cache_folder"] == str(tmp_path / "hf" / DEFAULT_FOLDER)
    assert {row["role"] for row in rows.values()} >= {"default", "multilingual", "quality"}
    assert all(row["onnx"] in (True, False, None) and row["runtime"] for row in rows.values())

    table = runner.invoke(cli, ["models"], env=env)
    assert "ViT-B-32  " in table.output and "66.6%" in table.output and "clipseek models fetch" in table.output
    assert "Not on the ONNX path" not in table.output

    with serving_hub() as server:
        fetched = runner.invoke(cli, ["models", "fetch", HUB_MODEL, "--json"], env={**env, "HF_ENDPOINT": server.url})
    assert fetched.exit_code == 0, fetched.output
    document = json.loads(fetched.stdout)
    assert document["folder"] == str(tmp_path / "hf" / "models--clipseek-test--demo")
    assert sha256_file(document["weights"]) == sha256_file(demo_checkpoint())
    assert hub.cached(hub.files_for(HUB_MODEL, None), tmp_path / "hf") is not None

    offline = runner.invoke(cli, ["models", "fetch", "ViT-B-32"], env={**env, "CLIPSEEK_OFFLINE": "1"})
    assert offline.exit_code == 1 and "clipseek is offline" in offline.output


@pytest.mark.slow
def test_models_bench_compares_speed_with_the_default_at_random_weights(tmp_path, no_network):
    result = CliRunner().invoke(cli, ["models", "--bench", "demo", "--json"], env=_env(tmp_path))
    assert result.exit_code == 0, result.output
    default, demo = json.loads(result.stdout)
    assert default["model"] == "ViT-B-32" and default["images_vs_default"] == 1.0
    # The demo model is a few layers of width 128: many times faster than ViT-B-32.
    assert demo["model"] == "demo" and demo["images_vs_default"] > 2 and demo["texts_vs_default"] > 2
    assert not (tmp_path / "hf").exists()  # nothing was downloaded


def test_a_hugging_face_tokenizer_is_fetched_once_and_missing_it_fails_at_once(tmp_path, monkeypatch):
    """SigLIP reads its tokenizer from the hub repository timm/ViT-B-16-SigLIP (a T5 vocabulary,
    built here in its format): fetched once with the model, then read offline; where it cannot
    be had, one message at once instead of transformers' minute of retries per file."""
    served = {path.name: path.read_bytes() for path in siglip_t5(tmp_path / "tokenizer").iterdir()}
    cache, architecture = tmp_path / "hf", "ViT-B-16-SigLIP"
    assert hub.text_repos(architecture) == ("timm/ViT-B-16-SigLIP",) and hub.text_repos("ViT-B-32") == ()
    with pytest.raises(ModelError) as offline:
        hub.text_files(architecture, cache, offline=True)
    for part in ("tokenizer files of ViT-B-16-SigLIP", "clipseek is offline", "clipseek models fetch ViT-B-16-SigLIP"):
        assert part in str(offline.value)
    assert "models--timm--ViT-B-16-SigLIP" in str(offline.value) and "--checkpoint" not in str(offline.value)

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(ModelError, match="cannot be reached"):
        hub.text_files(architecture, cache)
    assert time.monotonic() - start < 5

    with serving_hub({"timm/ViT-B-16-SigLIP": served}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        hub.text_files(architecture, cache)
        asked = len(server.requests)
        hub.text_files(architecture, cache)
        assert len(server.requests) == asked, "cached: the hub is not asked again"
    hub.text_files(architecture, cache, offline=True)
    (snapshot,) = (cache / "models--timm--ViT-B-16-SigLIP" / "snapshots").iterdir()
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(served)

    result = subprocess.run(  # the command line: before torch, and before any index is made
        [
            sys.executable,
            "-c",
            OFFLINE_SCRIPT,
            "index",
            str(tmp_path),
            "--model",
            architecture,
            "--pretrained",
            "webli",
        ],
        env=_env(tmp_path / "elsewhere", CLIPSEEK_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(result.stdout)
    assert "tokenizer files of ViT-B-16-SigLIP" in report["message"] and not report["torch"], report


def test_models_says_why_a_model_is_not_on_the_onnx_path(tmp_path, monkeypatch):
    from indexer.models import backend
    from indexer.models.identity import ModelId

    monkeypatch.setenv("CLIPSEEK_CACHE", str(tmp_path / "cache"))
    choice = next(choice for choice in CHOICES if choice.architecture == "xlm-roberta-base-ViT-B-32")
    model_id = ModelId(choice.architecture, choice.pretrained, None, choice.dim, choice.image_size)
    reason = "the ONNX exporter failed on text tower: an operator it lacks"
    backend._refuse(backend.export_dir(model_id), reason)  # as a failed export records it
    table = CliRunner().invoke(cli, ["models"], env=_env(tmp_path))
    assert table.exit_code == 0, table.output
    row = next(line for line in table.output.splitlines() if line.startswith("xlm-roberta-base-ViT-B-32 "))
    assert row.rstrip().endswith("no (torch)")
    assert f"Not on the ONNX path:\n  xlm-roberta-base-ViT-B-32 / laion5b_s13b_b90k: {reason}\n" in table.output
