"""Write a two-style training corpus: the pydoc *training* split plus the Jargon File's entries.

A predictor trained on pydoc alone learns what derailment looks like in technical prose about
Python; on a corpus of another style (Jane Austen) its gate hardly opens. This corpus adds an
informal, discursive English text (the Jargon File, from Debian's ``jargon-text`` package,
downloaded with ``apt-get download`` and unpacked with ``dpkg -x``, no install) so the predictor
sees two registers. Only pydoc's training split goes in, so ``--split test`` on the embedded
corpus stays unseen; Austen stays unseen entirely.

Entries are merged into documents of about 2000 characters, the size of the pydoc documents, and
written as JSON lines (``{"text": ...}``) so a document's internal blank lines survive.

    python benchmarks/corpora/mixed_train.py --out runs/mixed-train.jsonl
    entcal train --corpus runs/mixed-train.jsonl --out runs/train-mixed --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

from debpkg import package_file

from entcal import corpora

_JARGON = "usr/share/doc/jargon-text/jargon.txt.gz"
_ENTRY = re.compile(r"^   :[^:]+:")


def jargon_documents(text: str, size: int = 2000) -> list[str]:
    """The glossary entries of the Jargon File, merged into documents of about ``size`` chars."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if _ENTRY.match(line))
    entries, current = [], []
    for line in lines[start:]:
        if _ENTRY.match(line) and current:
            entries.append(current)
            current = []
        current.append(line.strip())
    entries.append(current)
    docs, doc = [], []
    for entry in entries:
        paragraphs = " ".join(entry).replace("  ", "\n\n").split("\n\n")
        body = "\n\n".join(p.strip() for p in paragraphs if p.strip())
        if len(body) < 80:
            continue
        doc.append(body)
        if sum(len(d) for d in doc) >= size:
            docs.append("\n\n".join(doc))
            doc = []
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    text = gzip.decompress(package_file("jargon-text", _JARGON)).decode("utf-8")
    pydoc = list(corpora.default_corpus().split("train").documents)
    every = jargon_documents(text)
    # Evenly spaced over the alphabet rather than the first letters only.
    jargon = every[:: max(1, len(every) // len(pydoc))][: len(pydoc)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        for doc in pydoc + jargon:
            handle.write(json.dumps({"text": doc}) + "\n")
    print(f"{args.out}: {len(pydoc)} pydoc training documents + {len(jargon)} Jargon File ones")


if __name__ == "__main__":
    main()
