"""Write *The Debian Administrator's Handbook* as an entcal ``.txt`` corpus (a corpus no predictor saw).

Modern technical English prose (a book on running Debian systems, Raphaël Hertzog and Roland Mas,
GPL-2+ / CC-BY-SA-3.0), taken from Debian's ``debian-handbook`` package: the package is
downloaded with ``apt-get download`` (no install), unpacked with ``dpkg -x``, and the English
HTML chapters are read in the book's order. Each DocBook paragraph (``<div class="para">``)
becomes one paragraph of text, inline markup kept as its text, program listings and tables
dropped; paragraphs are joined into documents of at least 2000 characters (the size of the
embedded pydoc corpus's documents; 2000-3177 here), one per blank-line-separated block, within one
HTML page (a page's short remainder is dropped).

    python benchmarks/corpora/debian_handbook.py --out runs/handbook.txt
    entcal compare --human runs/handbook.txt --decoders "ancestral; calibrated" --out runs/handbook
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from debpkg import join_paragraphs, unpacked

_HTML = "usr/share/doc/debian-handbook/html/en-US"
_SKIPPED = frozenset({"pre", "script", "style", "table"})


class _Paragraphs(HTMLParser):
    """The text of each ``<div class="para">`` of one page, listings and tables left out."""

    def __init__(self) -> None:
        super().__init__()
        self.paragraphs: list[str] = []
        self._parts: list[str] | None = None
        self._div_depth = 0  # divs open inside the current paragraph
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in _SKIPPED:
            self._skipping += 1
        if tag != "div":
            return
        if self._parts is not None:
            self._div_depth += 1
        elif ("class", "para") in attrs:
            self._parts, self._div_depth = [], 0

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            self._skipping = max(0, self._skipping - 1)
        if tag != "div" or self._parts is None:
            return
        if self._div_depth:
            self._div_depth -= 1
            return
        text = re.sub(r"\s+", " ", "".join(self._parts)).strip()
        if text:
            self.paragraphs.append(text)
        self._parts = None

    def handle_data(self, data: str) -> None:
        if self._parts is not None and not self._skipping:
            self._parts.append(data)


def _pages_in_order(html: Path) -> Iterator[str]:
    """The pages' HTML in reading order: follow each page's ``rel="next"`` link from
    ``index.html``."""
    page, seen = "index.html", set()
    while page and page not in seen and (html / page).exists():
        seen.add(page)
        text = (html / page).read_text(encoding="utf-8")
        yield text
        found = re.search(r'<link rel="next" href="([^"#]+)"', text)
        page = found.group(1) if found else None


def documents(html: Path, size: int = 2000) -> list[str]:
    docs = []
    for text in _pages_in_order(html):
        parser = _Paragraphs()
        parser.feed(text)
        docs += join_paragraphs(parser.paragraphs, size)
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the .txt file to write")
    args = parser.parse_args()
    with unpacked("debian-handbook") as root:
        docs = documents(root / _HTML)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    print(f"wrote {len(docs)} documents, {sum(map(len, docs))} characters to {args.out}")


if __name__ == "__main__":
    main()
