"""Walk the journal's HMAC chain: exit 0 when it is intact, 1 naming the first problem.

The chain is held against the head file and against every anchor found in the storage
locations. With --start-new-chain --reason "...", a person acknowledges that this database's
journal replaces the one the head file or the anchors name (the portal was pointed at a new
database): that is journaled, and the check runs again. With --acknowledge-loss --reason "...",
a person acknowledges that the entries the anchors name past the end of a journal restored
from a selfbackup (restoreportal) were lost with the old host (backupportal/journal_loss.py).
"""

import getpass
import time

from backupportal import journal, journal_anchors, journal_loss
from backupportal.lib.commands import PortalCommand, fail


class Command(PortalCommand):
    help = "Check that the operations journal is intact: no entry changed, deleted, cut off the end or inserted."

    def add_arguments(self, parser):
        parser.add_argument(
            "--start-new-chain",
            action="store_true",
            help="acknowledge that this database's journal replaces the one the head file or anchors name",
        )
        parser.add_argument(
            "--acknowledge-loss",
            action="store_true",
            help="acknowledge that the entries after a restored journal's end were lost with the old host",
        )
        parser.add_argument(
            "--reason", default="", help="why (journaled); required with --start-new-chain or --acknowledge-loss"
        )

    def run(self, start_new_chain=False, acknowledge_loss=False, reason="", **options):
        started = time.monotonic()
        acknowledged, loss = [], None
        if start_new_chain and acknowledge_loss:
            fail("--start-new-chain and --acknowledge-loss are two different acknowledgments: give one")
        if start_new_chain and not reason.strip():
            fail('--start-new-chain needs --reason "...": say why this database now holds a new journal')
        if acknowledge_loss and not reason.strip():
            fail('--acknowledge-loss needs --reason "...": say how you know the portal was restored (it is journaled)')
        if start_new_chain:
            _, acknowledged = journal.start_new_chain(reason.strip(), actor=f"os:{getpass.getuser()}")
        elif acknowledge_loss:
            _, loss = journal_loss.acknowledge(reason.strip(), actor=f"os:{getpass.getuser()}")
        elif reason:
            fail("--reason goes with --start-new-chain or --acknowledge-loss: without them it has nothing to explain")
        verdict = journal.check()
        return {
            "ok": verdict.ok,
            "message": verdict.message,
            "journal": verdict.journal,
            "entries_checked": verdict.count,
            "anchors": verdict.anchors,
            "acknowledged": acknowledged,
            "loss_acknowledged": loss,
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
        if loss := result["loss_acknowledged"]:
            self.stdout.write(
                f"acknowledged: entries after #{loss['restored_up_to']} (up to #{loss['lost_up_to']}) were lost with the host"
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
