"""Read files of a Debian package without installing it (``apt-get download``, ``dpkg -x``)."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
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
