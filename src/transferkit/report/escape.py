"""Text from the user's files (class, folder and file names, data paths) made inert in the reports:
one rule for report.html and report.md (a Markdown viewer passes inline HTML through)."""

from __future__ import annotations

import html
import re
from typing import Any
from urllib.parse import quote

# Markdown's inline specials and table pipes ('<', '>' and '&' are HTML's, already entities);
# '_' inside a word (class_001) starts no emphasis in CommonMark, so it stays readable there
_MARKDOWN = re.compile(r"[\\`*\[\]|~#]|(?<![^\W_])_|_(?![^\W_])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a line break would end a table row or a heading


def html_text(value: Any, quotes: bool = True) -> str:
    """Any value as HTML text: `<`, `>`, `&` (and quotes, which matter inside an attribute) as
    entities."""
    return html.escape(str(value), quote=quotes)


def md_text(value: Any) -> str:
    """Any value as Markdown text that shows the same characters in every viewer: HTML-escaped
    (html_text), Markdown's specials and table pipes as numeric character references too (a
    reference is text in CommonMark, and unlike a backslash every viewer reads it: Python-Markdown
    shows '\\~'), control characters as their escapes (a folder 'a<newline>b' reads 'a\\nb')."""
    shown = _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value))
    # quotes stay: with '<' escaped no tag, so no attribute, can open
    return _MARKDOWN.sub(lambda m: f"&#{ord(m.group())};", html_text(shown, quotes=False))


def md_picture(alt: str, file: str) -> str:
    """![alt](file) for a picture beside the report; the file name percent-encoded (an eval
    report's name holds the data folder's)."""
    return f"![{md_text(alt)}]({quote(file)})"


def md_link(file: str) -> str:
    """[file](file) for a file beside the report."""
    return f"[{md_text(file)}]({quote(file)})"
