"""The README's examples run as written: every block marked `<!-- tested -->` runs, in the order
the README gives them, as a user would type them, in a home folder of its own (`~` is a fresh
temporary folder, with the default data directory under it). A block marked
`<!-- file: NAME -->` is written to NAME in that home first, as a user would save it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"<!-- (tested|file: (\S+)) -->\n```(\w+)\n(.*?)```", re.S)
HIT = re.compile(r"^\s*-?\d\.\d+\s+(\S+\.(?:jpg|png))$", re.M)

pytest.importorskip("fastapi")  # the README installs the server extra in its tour


def _blocks() -> list[tuple[str | None, str, str]]:
    text = README.read_text(encoding="utf-8")
    return [(name or None, language, code) for _, name, language, code in BLOCK.findall(text)]


def test_the_readme_marks_its_examples():
    languages = [language for name, language, _ in _blocks() if name is None]
    assert languages.count("sh") >= 4 and languages.count("python") >= 3


@pytest.mark.slow
def test_every_marked_example_runs_as_written(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("CLIPSEEK_HOME", "XDG_DATA_HOME")}
    env.update(HOME=str(tmp_path), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    outputs = []
    for name, language, code in _blocks():
        if name is not None:
            (tmp_path / name).write_text(code, encoding="utf-8")
            continue
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "sh" else [sys.executable, "-c", code]
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"this README example failed:\n{code}\n{run.stdout}\n{run.stderr}"
        assert "Error:" not in run.stderr and "Traceback" not in run.stderr, run.stderr
        outputs.append(run.stdout)

    # What the tour shows a user: its text search finds large red circles first.
    captions = {
        row["image"]: row["caption"]
        for row in map(json.loads, (tmp_path / "clipseek-demo" / "captions.jsonl").read_text().splitlines())
    }
    top = HIT.findall(outputs[0])[0]
    assert "large red circle" in captions[os.path.relpath(top, tmp_path / "clipseek-demo")]
