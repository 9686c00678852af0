"""MkDocs hook: the code's layout, rendered at build time from the source tree.

A page that holds the marker below gets, in its place, one table row per module of
src/transferkit: its path, its lines and the first line of its docstring, so the page never
describes a module that moved or a job that changed.
"""

from __future__ import annotations

import ast
from pathlib import Path

MARKER = "<!-- code-layout -->"
PACKAGE = Path(__file__).resolve().parents[2] / "src" / "transferkit"


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace the marker with the table of modules."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render(PACKAGE))


def render(package: Path) -> str:
    """A table (module, lines, its job) of every .py file under `package`, top level first."""
    rows = ["| module | lines | its job |", "| --- | ---: | --- |"]
    for path in sorted(package.rglob("*.py"), key=lambda p: (len(p.relative_to(package).parts), p)):
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        job = " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|")
        rows.append(f"| `{path.relative_to(package.parent)}` | {len(text.splitlines())} | {job} |")
    return "\n".join(rows)
