"""Writing files so that readers never see half of one, and naming their contents."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a uniquely named temporary file beside `target`, then move it into place: readers
    see the old file or the new one, never a partial one, and concurrent writers never share a temporary."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the file private; use the usual permissions
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(target: Path, text: str) -> None:
    """`atomic_write` of a UTF-8 text."""
    atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(target: Path, data: object) -> None:
    """`atomic_write_text` of `data` as indented JSON (a measurement, a derived preset, a search result)."""
    atomic_write_text(Path(target), json.dumps(data, indent=1) + "\n")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
