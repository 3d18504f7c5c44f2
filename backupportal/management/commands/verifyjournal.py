"""Walk the journal's HMAC chain: exit 0 when it is intact, 1 naming the first bad entry."""

import time

from backupportal import journal
from backupportal.lib.commands import PortalCommand


class Command(PortalCommand):
    help = "Check that the operations journal is intact: no entry changed, deleted, cut off the end or inserted."

    def run(self, **options):
        started = time.monotonic()
        ok, message, count = journal.verify()
        return {
            "ok": ok,
            "message": message,
            "entries_checked": count,
            "duration_s": round(time.monotonic() - started, 3),
            "exit_code": 0 if ok else 1,
        }

    def describe(self, result):
        if not result["ok"]:
            # One line on stderr, like every other failure of a command; stdout stays empty.
            self.stderr.write(f"journal NOT intact: {result['message']}")
            return []
        return [result["message"]]
