"""Turn MediaWiki markup into clean prose paragraphs (for the embedded Wikipedia sample).

Not a full wikitext parser: it drops templates, tables, references, files, categories and
headings, keeps link text, and keeps only paragraphs of running prose.
"""

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTLINK = re.compile(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]")
_TAG = re.compile(r"<[^>]+>")
_QUOTES = re.compile(r"'{2,}")
_SPACES = re.compile(r"[ \t\u00a0]+")
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "help:", "template:")
_STOP_SECTIONS = {"see also", "references", "external links", "notes", "further reading", "bibliography",
                  "sources", "citations", "footnotes"}
MIN_PARAGRAPH_WORDS = 8


def _repeat(pattern: re.Pattern, repl, text: str) -> str:
    """Apply an innermost-first pattern until nothing changes (handles nesting)."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link_text(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    lowered = target.strip().lower()
    if lowered.startswith(_DROP_LINK_PREFIXES) or re.match(r"^[a-z]{2,3}(-[a-z]+)?:", lowered):
        return ""
    return (match.group(1).rsplit("|", 1)[-1] if label else target).strip()


def strip_markup(text: str) -> list[str]:
    """Wikitext -> list of prose paragraphs (plain text, single-spaced)."""
    text = html.unescape(text)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _repeat(_TEMPLATE, "", text)
    text = _repeat(_TABLE, "", text)
    text = _repeat(_LINK, _link_text, text)
    text = _EXTLINK.sub(lambda m: m.group(1), text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    paragraphs = []
    for line in text.split("\n"):
        line = _SPACES.sub(" ", line).strip()
        heading = re.fullmatch(r"=+\s*(.*?)\s*=+", line)
        if heading:
            if heading.group(1).lower() in _STOP_SECTIONS:
                break
            continue
        if not line or line[0] in "*#:;|!{}[=" or len(line.split()) < MIN_PARAGRAPH_WORDS:
            continue
        paragraphs.append(line)
    return paragraphs


def iter_articles(dump_bz2: Path) -> Iterator[tuple[str, str]]:
    """Yield (title, clean text) for each main-namespace, non-redirect article of a bz2 XML dump."""
    with bz2.open(dump_bz2, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.find("{*}ns")
            title = elem.findtext("{*}title") or ""
            redirect = elem.find("{*}redirect")
            raw = elem.findtext("{*}revision/{*}text") or ""
            elem.clear()
            if (ns is not None and ns.text != "0") or redirect is not None:
                continue
            paragraphs = strip_markup(raw)
            if paragraphs:
                yield title, "\n\n".join(paragraphs)
