"""Private scratch directories under VAR_DIR/scratch for files a run must not leave behind
(a decrypted manifest, a restore's dump): each is named `<kind>-<pid>-...` so that the next run
can tell what a killed run left (its pid gone) and remove it; probes found such files kept for ever."""

import os
import shutil
import tempfile
from pathlib import Path

from django.conf import settings


def scratch_dir(kind):
    """A new 0700 directory VAR_DIR/scratch/<kind>-<pid>-XXXX, after clearing dead runs' ones of that kind.
    The caller removes it when done."""
    root = Path(settings.VAR_DIR) / "scratch"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for leftover in root.glob(f"{kind}-*"):
        pid = leftover.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=root))
