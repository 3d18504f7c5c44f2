"""Walk the journal's HMAC chain: exit 0 when it is intact, 1 naming the first problem.

The chain is held against the head file and against every anchor found in the storage
locations. With --start-new-chain --reason "...", a person acknowledges that this database's
journal replaces the one the head file or the anchors name (the portal was pointed at a new
database): that is journaled, and the check runs again.
"""

import getpass
import time

from backupportal import journal, journal_anchors
from backupportal.lib.commands import PortalCommand, fail


class Command(PortalCommand):
    help = "Check that the operations journal is intact: no entry changed, deleted, cut off the end or inserted."

    def add_arguments(self, parser):
        parser.add_argument(
            "--start-new-chain",
            action="store_true",
            help="acknowledge that this database's journal replaces the one the head file or anchors name",
        )
        parser.add_argument("--reason", default="", help="why (journaled); required with --start-new-chain")

    def run(self, start_new_chain=False, reason="", **options):
        started = time.monotonic()
        acknowledged = []
        if start_new_chain:
            if not reason.strip():
                fail('--start-new-chain needs --reason "...": say why this database now holds a new journal')
            _, acknowledged = journal.start_new_chain(reason.strip(), actor=f"os:{getpass.getuser()}")
        elif reason:
            fail("--reason goes with --start-new-chain: without it there is nothing to give a reason for")
        verdict = journal.check()
        return {
            "ok": verdict.ok,
            "message": verdict.message,
            "journal": verdict.journal,
            "entries_checked": verdict.count,
            "anchors": verdict.anchors,
            "acknowledged": acknowledged,
            "duration_s": round(time.monotonic() - started, 3),
            "exit_code": 0 if verdict.ok else 1,
        }

    def describe(self, result):
        for other in result["acknowledged"]:
            which = f"journal {other['journal']}" if other["journal"] else "a journal from before journal ids"
            counted = f", {other['count']} entries" if other["count"] else ""
            self.stdout.write(
                f"acknowledged: {which} (last known entry #{other['last_entry']}{counted}, "
                f"seen in {other['seen_in']}) is left behind"
            )
        for store in result["anchors"]:
            found = (
                f"unreachable: {store['error']}"
                if store["error"]
                else f"{journal_anchors.anchor_count_text(store['anchors'])} read"
            )
            self.stdout.write(f"anchors in location {store['location']}: {found}")
        if not result["ok"]:
            # One line on stderr, like every other failure of a command.
            self.stderr.write(f"journal NOT intact: {result['message']}")
            return []
        return [result["message"]]
