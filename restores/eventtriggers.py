"""Production's event triggers in a logical restore: created last.

A dump brings the database's event triggers. Restored in the dump's place they would fire on the
portal's own work in the copy: DDL triggers (an audit, or a guard refusing DDL) on detaching a
subscription or a move to another tablespace, and from PostgreSQL 17 a login trigger on every
session the restore opens after pg_restore made it. So they are held back from the restore and
created by one last pg_restore when the portal is done there. Connections afterwards (a restore
test's checks) turn them off where the role may (targetdb.connect_to_copy).
"""

import re
import shutil

from backupportal.lib.scratch import scratch_dir
from restores import dbprops, dumpstream
from restores.targetdb import RestoreFailed

# Up to PostgreSQL 15 only a superuser owns a subscription: one owned by production's superuser
# fails onto a cluster where that role was created without SUPERUSER (restores.cluster_globals).
SUBSCRIPTION_ENTRY = re.compile(r"^\d+; \d+ \d+ (?:SUBSCRIPTION - |(?:COMMENT|SECURITY LABEL) - SUBSCRIPTION )")
ANY_SUBSCRIPTION_OWNER = 160000  # from PostgreSQL 16, pg_create_subscription is enough


class EventTriggers:
    """Production's event triggers, held back from the restore (a use-list without them) and
    created by a last pg_restore once the portal's own statements in the copy are done (the WAL
    flush, detaching subscriptions, the database's properties, tablespace moves): no DDL trigger
    fires on those, and from PostgreSQL 17 no login trigger on the restore's sessions. Nothing
    changes for a dump without any, or whose table of contents could not be read.

    With `subscriptions` (a target before PostgreSQL 16) its subscriptions are held back too, and
    created (restores.logical) before they are detached: each may then fall back to the
    restoring role as its owner, where the whole restore failed."""

    def __init__(self, props, subscriptions=False):
        self.listing = props.listing if props is not None else None  # the dump's table of contents, listed
        lines = self.listing.splitlines() if self.listing is not None else []
        self.entries = [line for line in lines if dbprops.EVENT_TRIGGER_ENTRY.match(line)]
        self.subscriptions = [line for line in lines if subscriptions and SUBSCRIPTION_ENTRY.match(line)]
        self.head = props.head if props is not None else None
        self.directory = None
        self.confirmed = False  # the head is what the restored, verified copy begins with
        if self.held:  # beside the restore's scratch files, cleared with them if it is killed
            self.directory = scratch_dir("restore")
            held = set(self.entries) | set(self.subscriptions)
            (self.directory / "without").write_text("".join(f"{';' * (line in held)}{line}\n" for line in lines))
            (self.directory / "only").write_text("".join(f"{line}\n" for line in self.entries))
            (self.directory / "subscriptions").write_text("".join(f"{line}\n" for line in self.subscriptions))

    @property
    def held(self):
        return bool(self.entries or self.subscriptions)

    def args(self):
        return [f"--use-list={self.directory / 'without'}"] if self.held else []

    def wanted(self):
        """How much of the restored copy's start verified() needs: the head, when anything is held."""
        return len(self.head) if self.held else 0

    def verified(self, start):
        """`start`: the first wanted() bytes of the copy the restore read and verified. The head,
        read before (unverified, perhaps from another copy), is used only when it is the same."""
        self.confirmed = self.held and start == self.head

    def check(self):
        """RestoreFailed unless nothing is held or the head is the restored copy's start."""
        if self.held and not self.confirmed:
            raise RestoreFailed(
                "the table of contents read before the restore is not the start of the copy restored (its"
                " location returned different data twice): the dump's event triggers were not created; check"
                " the location and restore again"
            )

    def only(self, which="only"):
        """The use-list of the event triggers ("only") or of the subscriptions ("subscriptions")."""
        return [f"--use-list={self.directory / which}"]

    def create(self, tool, target, what="event trigger"):
        """The held-back entries, by `tool` (a pg_restore given only()) fed the table of contents
        alone: neither an event trigger nor a subscription has data."""
        self.check()
        if dumpstream.fed_toc(tool, self.head) != 0:
            raise RestoreFailed(f"the dump's {what}s could not be created: {tool.error_line(target)}")
        if what == "subscription":
            return []  # said by their detaching (targetdb.detach_all)
        count = sum(" EVENT TRIGGER - " in line for line in self.entries)
        return [f"{count} event trigger(s) created last, after the restore's own statements in the copy"]

    def remove(self):
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
