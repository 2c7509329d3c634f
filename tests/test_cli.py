import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from indexer.demo_world import ATTRIBUTES, Scene, caption
from search.cli.main import cli

CLIPSEEK = shutil.which("clipseek", path=str(Path(sys.executable).parent))


def run(*args, **env):
    return subprocess.run(
        [CLIPSEEK, *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=120, check=False
    )


def test_help_lists_the_commands_without_importing_torch():
    result = run("--help", PYTHONPROFILEIMPORTTIME="1")
    assert result.returncode == 0
    assert "Search photo libraries" in result.stdout and "demo" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "click" in imported  # the import profile was read
    assert not {"torch", "open_clip", "numpy"} & imported


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"clipseek, version {version('clipseek')}"


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_demo_writes_a_deterministic_library_of_jpeg_and_png(tmp_path):
    result = run("demo", str(tmp_path / "a"), "--count", "12", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # messages go to stderr
    assert "wrote 12 pictures" in result.stderr

    rows = [json.loads(line) for line in (tmp_path / "a" / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    formats = set()
    for row in rows:
        path = tmp_path / "a" / row["image"]
        assert len(Path(row["image"]).parts) == 3  # album/background/picture
        with Image.open(path) as image:
            formats.add(image.format)
            assert image.size[0] == image.size[1] >= 192
        assert row["caption"] == caption(Scene(**{name: row[name] for name in ATTRIBUTES}))
    assert formats == {"JPEG", "PNG"}

    assert CliRunner().invoke(cli, ["demo", str(tmp_path / "b"), "--count", "12", "--seed", "3"]).exit_code == 0
    assert CliRunner().invoke(cli, ["demo", str(tmp_path / "c"), "--count", "12", "--seed", "4"]).exit_code == 0
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert digests(tmp_path / "a") != digests(tmp_path / "c")


def test_demo_refuses_bad_arguments_with_a_message(tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    result = CliRunner().invoke(cli, ["demo", str(afile)])
    assert result.exit_code == 2 and "is a file" in result.output
    result = CliRunner().invoke(cli, ["demo", str(tmp_path / "d"), "--count", "0"])
    assert result.exit_code == 2 and "--count" in result.output
