"""Read one file of a Debian package without installing it (``apt-get download``, ``dpkg -x``)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path


def package_file(package: str, path: str) -> bytes:
    """The bytes of ``path`` (relative to ``/``) inside the Debian package ``package``."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", package], cwd=tmp, check=True)
        (deb,) = Path(tmp).glob("*.deb")
        subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        return (Path(tmp) / "x" / path).read_bytes()
