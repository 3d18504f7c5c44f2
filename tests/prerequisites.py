"""What the suite needs from the machine, checked before the first test runs.

A missing package used to surface as a "Permission denied" deep inside one test; here it is
named with the command that installs it, and the suite does not start. The packages are
the ones scripts/system-packages installs (`make test` runs it first).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

# program -> the Debian package that brings it
PROGRAMS = {
    "gpg": "gnupg",
    "psql": "postgresql-client-15",
    "runuser": "util-linux",
    "strace": "strace",
    "pgbackrest": "pgbackrest",
    "zstd": "zstd",
    "chromium": "chromium",
    "pdftoppm": "poppler-utils",
}
SERVER = "postgresql-15"  # initdb and postgres for the throwaway clusters


def problems():
    found = [f"{name} (apt-get install {package})" for name, package in PROGRAMS.items() if not shutil.which(name)]
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) and not os.environ.get("PG_BIN"):
        found.append(f"initdb (apt-get install {SERVER})")
    if os.geteuid() == 0 and shutil.which("runuser"):
        found += _unprivileged_python()
    return found


def _unprivileged_python():
    """The read-only-location tests run this interpreter as `nobody`: it must be able to."""
    done = subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-c", "import django"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode == 0:
        return []
    why = (done.stderr.strip().splitlines() or ["it did not start"])[-1]
    return [
        f"{sys.executable} cannot be run by an unprivileged user ({why}): make the venv from a Python "
        "outside a private home directory, e.g. `rm -rf .venv && make test PYTHON=/usr/bin/python3`"
    ]


def check():
    missing = problems()
    if missing:
        lines = "\n  ".join(missing)
        raise SystemExit(f"The test suite cannot start; missing on this machine:\n  {lines}")
