"""Devices as a user meets them: --device on index, search and serve; where pictures were embedded;
half precision held to float32. CUDA_VISIBLE_DEVICES="" hides every GPU, so that the errors for
a device that is not there read the same on a machine with one; the cases that need a GPU skip."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.config import IndexSettings, usable_cores
from indexer.demo_world import write_library
from indexer.models.devices import CPU, Placement, place
from indexer.models.encoder import HALF_COSINE, load_encoder
from tests.command_line import clipseek

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU that torch can use")
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GPUs are counted from the driver on Linux")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSEEK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return tmp_path / "home"


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    folder = tmp_path_factory.mktemp("devices") / "library"
    write_library(folder, count=12, seed=5)
    return folder


@linux
@pytest.mark.parametrize("command", [("index", "LIBRARY"), ("search", "a red circle"), ("serve",)])
def test_a_gpu_that_is_not_there_is_one_error_line_before_any_work(home, library, command):
    args = [str(library) if arg == "LIBRARY" else arg for arg in command]
    started = time.monotonic()
    run = clipseek(*args, "--model", "demo", "--device", "cuda", check=False) if command[0] == "index" else None
    run = run or clipseek(*args, "--device", "cuda", check=False)
    assert time.monotonic() - started < 10  # no model loaded, nothing decoded
    assert run.returncode == 1 and run.stdout == ""
    (line,) = run.stderr.splitlines()
    assert line.startswith("Error: cuda:0 is not available: this machine has no NVIDIA GPU (")
    why = ("(no NVIDIA driver is loaded)", "(none visible: CUDA_VISIBLE_DEVICES='')")  # a machine without, or with
    assert line.endswith(tuple(f"{reason}; use --device cpu or auto" for reason in why))
    assert not home.exists()  # no index was made


def test_a_word_that_is_no_device_is_a_usage_error(home, library):
    run = clipseek("index", library, "--model", "demo", "--device", "gpu", check=False)
    assert run.returncode == 2
    assert "Invalid value for '--device': 'gpu' is not a device: give one of auto|cpu|cuda|cuda:N|mps" in run.stderr


@pytest.mark.skipif(sys.platform == "darwin", reason="Apple silicon may have mps")
def test_mps_off_a_mac_says_what_it_is(home, library):
    run = clipseek("index", library, "--model", "demo", "--device", "mps", check=False)
    assert run.returncode == 1
    assert run.stderr.startswith("Error: mps is not available (torch here sees cpu")
    assert "Apple silicon's GPU, through torch on macOS" in run.stderr


@pytest.mark.parametrize("backend, runtime", [("auto", "ONNX Runtime"), ("torch", "torch")])
def test_the_summary_and_status_say_where_pictures_were_embedded(home, library, monkeypatch, backend, runtime):
    monkeypatch.setenv("CLIPSEEK_BACKEND", backend)
    run = clipseek("index", library, "--model", "demo", "--device", "cpu")
    assert run.stderr.splitlines()[-1].endswith(f"s: 12 embedded on cpu ({runtime})")
    assert f"embedded   the latest pictures on cpu ({runtime})\n" in clipseek("status").stdout
    assert clipseek("search", "a red circle", "-k", "1", "--device", "cpu", "--paths").stdout.startswith(str(library))


@linux
def test_auto_without_a_gpu_is_the_cpu_and_imports_no_torch():
    script = (
        "import sys; from indexer.models.devices import place; "
        "print(place('auto'), place('auto', queries=True), 'torch' in sys.modules)"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert run.stdout.split("\n")[0] == f"{CPU} {CPU} False"


@linux
def test_cuda_visible_devices_hides_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert place("auto") == CPU and place("cpu") == CPU
    assert Placement("cuda:3", "torch").cuda_index == 3


# -- half precision ----------------------------------------------------------------------------


def _pictures(library, count=8):
    return [Image.open(path).convert("RGB") for path in sorted(library.rglob("*.jpg"))[:count]]


def test_demo_pictures_in_float16_stay_within_the_bound_of_float32(library):
    """On the CPU, where it can run here (slower than float32 there, so never chosen on its own)."""
    encoder = load_encoder("demo", device="cpu")
    exact = encoder.embed_images(_pictures(library))
    assert encoder.to_device("cpu").half_pictures is False
    encoder.to_device("cpu", half=True)
    assert encoder.runs_on == "cpu (torch, float16)"
    half = encoder.embed_images(_pictures(library))
    assert half.dtype == np.float32 and np.allclose(np.linalg.norm(half, axis=1), 1, atol=1e-5)
    assert (exact * half).sum(1).min() >= HALF_COSINE
    assert encoder.half_precision_cosine() >= HALF_COSINE


@pytest.mark.slow
def test_vit_b_32_pictures_in_float16_stay_within_the_bound_of_float32(library):
    encoder = load_encoder("ViT-B-32", "random", device="cpu")
    exact = encoder.embed_images(_pictures(library, 4))
    half = encoder.to_device("cpu", half=True).embed_images(_pictures(library, 4))
    assert (exact * half).sum(1).min() >= HALF_COSINE


@cuda
def test_on_a_gpu_pictures_take_float16_where_it_measures_faithful(library):
    encoder = load_encoder("ViT-B-32", "random", device="cpu")
    exact = encoder.embed_images(_pictures(library))
    encoder.to_device("cuda:0")
    assert encoder.half_pictures and encoder.runs_on == "cuda:0 (torch, float16)"
    assert (exact * encoder.embed_images(_pictures(library))).sum(1).min() >= HALF_COSINE


@cuda
def test_on_a_gpu_the_index_says_so(home, library, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    run = clipseek("index", library, "--model", "demo", "--device", "cuda")
    assert "12 embedded on cuda:0 (" in run.stderr.splitlines()[-1]


def test_decoding_takes_every_core_where_a_gpu_embeds():
    cores = usable_cores()  # the process's affinity where the system has one (a container's cores)
    assert cores <= os.cpu_count()
    assert IndexSettings().decoding_threads(gpu=True) == cores
    assert IndexSettings().decoding_threads(gpu=False) == max(1, min(4, cores))  # the model's threads need the rest
    assert IndexSettings(workers=3).decoding_threads(gpu=True) == 3
