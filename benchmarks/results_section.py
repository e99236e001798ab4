"""The one way benchmark scripts write their figures into benchmarks/RESULTS.md.

Each script owns a section between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; a rerun
replaces that section in place and leaves every other section as it was."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: str | Path, begin: str, end: str, section: str) -> None:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) into the file at
    ``path``: in place of the old one if the markers are there, else appended."""
    path = Path(path)
    section = section.rstrip("\n")
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
