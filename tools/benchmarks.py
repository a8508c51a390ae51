"""BENCHMARKS.md's sections: what every benchmark's --record does with its table.

`record_section(body)` puts `body`, whose first line is its "## ..." heading, in place
of the section with that heading (other sections stay where they are), or appends it.
"""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def record_section(body: str, path: Path = BENCHMARKS) -> None:
    heading = body.split("\n", 1)[0]
    if not heading.startswith("## "):
        raise ValueError(f"a section starts with its '## ' heading, not {heading!r}")
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = doc.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    body = body.rstrip("\n") + "\n"
    if start is None:
        path.write_text(doc.rstrip("\n") + "\n\n" + body)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    rest = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + body + ("\n" + rest if rest else ""))
