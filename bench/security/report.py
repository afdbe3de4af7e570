"""``bench/SECURITY.md`` holds one top-level section per evaluation; each rewrites only its own."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, heading: str, text: str) -> None:
    """Put ``text`` (which starts with ``heading``, a ``# `` line) in place of that section of
    ``path``, or after the others when there is none; the other sections are kept as they are."""
    sections: list[list[str]] = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("# ") or not sections:
                sections.append([])
            sections[-1].append(line)
    body = ["\n".join(s).strip("\n") for s in sections if s and s[0] != heading]
    where = next((i for i, s in enumerate(sections) if s and s[0] == heading), len(body))
    body.insert(where, text.strip("\n"))
    path.write_text("\n\n".join(b for b in body if b) + "\n")
