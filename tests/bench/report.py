"""The benchmark report as Markdown: one run's figures with the machine and commit they come
from, written beside the JSON report and, for a run of every section, into the README between
its bench markers (so the README's table is always one whole run)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def machine() -> dict[str, str | int]:
    """What the figures were measured on: CPU model and cores, Python, the commit."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


def markdown(report: dict, tables: dict[str, list[tuple[str, str, str]]]) -> str:
    """Each section's rows as a table: figure, value, and what it is measured against."""
    m = report["machine"]
    lines = [
        f"Measured {m['date']} at commit `{m['commit']}` on {m['cpu']}, {m['cores']} cores, "
        f"Python {m['python']} (`make bench`).",
    ]
    for section, rows in tables.items():
        lines += ["", f"**{section}**", "", "| figure | value | baseline, goal |", "|---|---|---|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def into_readme(readme: Path, table: str) -> None:
    """Replace what stands between the README's bench markers with `table`."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(START) + len(START), text.index(END)
    readme.write_text(text[:start] + "\n" + table + text[end:], encoding="utf-8")
