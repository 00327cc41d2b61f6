"""Read files of a Debian package without installing it (``apt-get download``, ``dpkg -x``), and
join a text's paragraphs into documents of the embedded corpus's size."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def unpacked(package: str) -> Iterator[Path]:
    """The root of ``package``'s files, unpacked in a temporary folder removed on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", package], cwd=tmp, check=True)
        (deb,) = Path(tmp).glob("*.deb")
        subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        yield Path(tmp) / "x"


def package_file(package: str, path: str) -> bytes:
    """The bytes of ``path`` (relative to ``/``) inside the Debian package ``package``."""
    with unpacked(package) as root:
        return (root / path).read_bytes()


def join_paragraphs(paragraphs: Iterable[str], size: int = 2000) -> list[str]:
    """Consecutive paragraphs joined by spaces into documents of at least ``size`` characters
    (the embedded pydoc corpus's size); paragraphs of 40 characters or fewer (headings,
    captions) are dropped, and a short remainder at the end too."""
    docs, doc = [], ""
    for p in paragraphs:
        if len(p) <= 40:
            continue
        doc = f"{doc} {p}" if doc else p
        if len(doc) >= size:
            docs.append(doc)
            doc = ""
    return docs
