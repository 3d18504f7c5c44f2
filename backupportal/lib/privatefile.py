"""A secret written to a file only its owner reads (0600), whole or not at all."""

import os
from pathlib import Path


def write_private(path: Path, data: bytes):
    """Write `data` to `path` with mode 0600 from the first byte: a temporary file beside it,
    fsynced, then renamed over it, so a crash never leaves half a key."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
