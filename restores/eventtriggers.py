"""Production's event triggers in a logical restore: created last.

A dump brings the database's event triggers. Restored in the dump's place they would fire on the
portal's own work in the copy: DDL triggers (an audit, or a guard refusing DDL) on detaching a
subscription or a move to another tablespace, and from PostgreSQL 17 a login trigger on every
session the restore opens after pg_restore made it. So they are held back from the restore and
created by one last pg_restore when the portal is done there. Connections afterwards (a restore
test's checks) turn them off where the role may (targetdb.connect_to_copy).
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from restores import dbprops
from restores.targetdb import RestoreFailed


class EventTriggers:
    """Production's event triggers, held back from the restore (a use-list without them) and
    created by a last pg_restore once the portal's own statements in the copy are done (the WAL
    flush, detaching subscriptions, the database's properties, tablespace moves): no DDL trigger
    fires on those, and from PostgreSQL 17 no login trigger on the restore's sessions. Nothing
    changes for a dump without any, or whose table of contents could not be read."""

    def __init__(self, props, scratch_root):
        lines = props.listing.splitlines() if props is not None else []
        self.entries = [line for line in lines if dbprops.EVENT_TRIGGER_ENTRY.match(line)]
        self.head = props.head if props is not None else None
        self.directory = None
        self.confirmed = False  # the head is what the restored, verified copy begins with
        if self.entries:  # beside the restore's scratch files, cleared with them if it is killed
            self.directory = Path(tempfile.mkdtemp(prefix=f"restore-{os.getpid()}-", dir=scratch_root()))
            held = set(self.entries)
            (self.directory / "without").write_text("".join(f"{';' * (line in held)}{line}\n" for line in lines))
            (self.directory / "only").write_text("".join(f"{line}\n" for line in self.entries))

    def args(self):
        return [f"--use-list={self.directory / 'without'}"] if self.entries else []

    def wanted(self):
        """How much of the restored copy's start verified() needs: the head, when anything is held."""
        return len(self.head) if self.entries else 0

    def verified(self, start):
        """`start`: the first wanted() bytes of the copy the restore read and verified. The head,
        read before (unverified, perhaps from another copy), is used only when it is the same."""
        self.confirmed = bool(self.entries) and start == self.head

    def check(self):
        """RestoreFailed unless nothing is held or the head is the restored copy's start."""
        if self.entries and not self.confirmed:
            raise RestoreFailed(
                "the table of contents read before the restore is not the start of the copy restored (its"
                " location returned different data twice): the dump's event triggers were not created; check"
                " the location and restore again"
            )

    def only(self):
        return [f"--use-list={self.directory / 'only'}"]

    def create(self, tool, target):
        """The held-back entries, by `tool` (a pg_restore given only()) fed the table of contents
        alone: an event trigger has no data."""
        self.check()
        tool.stdin = subprocess.PIPE
        tool.start()
        try:
            tool.proc.stdin.write(self.head)
            tool.proc.stdin.close()
        except BrokenPipeError:  # it read what it needed (or failed: its exit code says)
            pass
        if tool.proc.wait() != 0:
            raise RestoreFailed(f"the dump's event triggers could not be created: {tool.error_line(target)}")
        count = sum(" EVENT TRIGGER - " in line for line in self.entries)
        return [f"{count} event trigger(s) created last, after the restore's own statements in the copy"]

    def remove(self):
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
