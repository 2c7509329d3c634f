"""clipseek as a user runs it, for the tests: the installed command in a subprocess, and a small
demo library indexed through it."""

import subprocess
import sys
from pathlib import Path

from indexer.demo_world import write_library

CLIPSEEK = str(Path(sys.executable).parent / "clipseek")


def clipseek(*args, check=True) -> subprocess.CompletedProcess:
    """Run `clipseek ARGS`; with `check`, a failure fails the test with what it printed."""
    result = subprocess.run([CLIPSEEK, *map(str, args)], capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def indexed_demo_library(tmp_path: Path, count: int = 24, seed: int = 7) -> tuple[Path, Path]:
    """A demo library with its pictures and captions indexed in the default index of
    $CLIPSEEK_HOME (set by the caller); (the library, the index folder)."""
    library = tmp_path / "library"
    write_library(library, count=count, seed=seed)
    clipseek("index", library, "--model", "demo")
    clipseek("add-captions", library / "captions.jsonl", "--collection", "demo")
    return library, tmp_path / "home" / "indexes" / "default"
