"""The WAL tests' spool fixture leaves nothing behind, even while a cluster still archives into it."""

import os
import tempfile
import threading
from pathlib import Path

from tests.walfixtures import remove_spool


def test_a_spool_still_written_into_while_it_is_removed_is_gone_afterwards():
    root = Path(tempfile.mkdtemp(prefix="bp-walspool-"))
    folder = root / "server"
    folder.mkdir()
    stop = threading.Event()

    for n in range(5000):  # a spool to walk for a while
        (folder / f"old-{n}").touch()

    def archive_command():
        """A segment every 2 ms into the server's folder, as an archiver writes: never a directory."""
        n = 0
        while not stop.wait(0.002):
            try:
                os.close(os.open(folder / f"{n:024X}", os.O_WRONLY | os.O_CREAT, 0o600))
            except FileNotFoundError:
                pass  # the folder is gone: the archive command fails, as it would
            n += 1

    writer = threading.Thread(target=archive_command)
    writer.start()
    try:
        remove_spool(root)
        assert not root.exists()
    finally:
        stop.set()
        writer.join()
