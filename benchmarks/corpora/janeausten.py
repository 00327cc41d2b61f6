"""Write Jane Austen's six novels as an entcal ``.txt`` corpus (a corpus no predictor saw).

The text comes from Debian's ``r-cran-janeaustenr`` package (public-domain novels from Project
Gutenberg, stored as R data): the package is downloaded with ``apt-get download`` (no install, no
R needed), unpacked with ``dpkg -x``, and the lines are read from its lazy-load database (zlib
blocks of R's XDR serialization; every string is a CHARSXP record). Paragraphs (blank-line
separated, chapter headings dropped) are joined into documents of about 2000 characters, the
size of the embedded pydoc corpus's documents, one per blank-line-separated block.

    python benchmarks/corpora/janeausten.py --out runs/austen.txt
    entcal compare --human runs/austen.txt --decoders "ancestral; calibrated" --out runs/austen
"""

from __future__ import annotations

import argparse
import struct
import zlib
from pathlib import Path

from debpkg import join_paragraphs, package_file

_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"


def _blocks(data: bytes) -> list[bytes]:
    """The zlib blocks of an R lazy-load database (each: 4-byte length, then a zlib stream)."""
    out, pos = [], 0
    while pos < len(data):
        inflater = zlib.decompressobj()
        out.append(inflater.decompress(data[pos + 4 :]))
        pos = len(data) - len(inflater.unused_data)
    return out


def _strings(blob: bytes) -> list[str]:
    """The CHARSXP strings of an XDR-serialized R object, in order (NA as '')."""
    out, i = [], 0
    while i < len(blob) - 8:
        flags, length = struct.unpack(">Ii", blob[i : i + 8])
        if flags & 0xFF == 9:  # CHARSXP
            if length == -1:
                out.append("")
                i += 8
                continue
            if 0 <= length < 100_000 and i + 8 + length <= len(blob):
                try:
                    out.append(blob[i + 8 : i + 8 + length].decode("utf-8"))
                    i += 8 + length
                    continue
                except UnicodeDecodeError:
                    pass
        i += 1
    return out


def documents(rdb: bytes, size: int = 2000) -> list[str]:
    docs = []
    for blob in _blocks(rdb):
        paragraphs, current = [], []
        for line in _strings(blob):
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        if current:
            paragraphs.append(" ".join(current))
        docs += join_paragraphs(
            (p for p in paragraphs if not p.upper().startswith("CHAPTER")), size
        )
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    docs = documents(package_file("r-cran-janeaustenr", _RDB))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n\n".join(docs) + "\n")
    print(f"{args.out}: {len(docs)} documents")


if __name__ == "__main__":
    main()
