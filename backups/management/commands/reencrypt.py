"""Re-encrypt kept artifacts to the current key: manage.py reencrypt --from-key KEYID [--json]."""

from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.osuser import os_actor
from backups.reencrypt import ReencryptError, reencrypt


class Command(PortalCommand):
    help = (
        "Re-encrypt every kept copy made with KEYID to the current key: streamed (plaintext never on disk), "
        "each new object's sha256 checked before the old one is removed. Run it again to continue after an "
        "interruption or a failure."
    )

    def add_arguments(self, parser):
        parser.add_argument("--from-key", required=True, help="the key id (see the key custody page)")

    def run(self, from_key, **options):
        try:
            outcome = reencrypt(from_key.strip(), actor=os_actor())
        except ReencryptError as e:
            fail(str(e))
        result = outcome.as_dict()
        result["exit_code"] = 1 if outcome.left else 0
        return result

    def describe(self, result):
        lines = [
            f"Re-encrypted {result['reencrypted']} copy(ies) from key {result['from_key']} to {result['to_key']}; "
            f"{result['old_removed']} old object(s) removed."
        ]
        if result["selfbackup"]:
            lines.append(
                f"Took portal backup #{result['selfbackup']} with key {result['to_key']}; removed the files of "
                f"{len(result['selfbackups_removed'])} portal backup(s) made with key {result['from_key']}."
            )
        if result["selfbackups_locked"]:
            lines.append(
                f"Portal backup(s) {result['selfbackups_locked']} are held by S3 Object Lock: they keep key "
                f"{result['from_key']} until the lock expires (the daily selfbackup removes them then)."
            )
        if result["old_waiting"]:
            lines.append(f"{result['old_waiting']} old object(s) could not be removed yet: run reencrypt again later.")
        lines += [f"  copy #{f['copy']}: {f['error']}" for f in result["failed"]]
        if result["skipped_bad"]:
            lines.append(
                f"Skipped copies found bad: {result['skipped_bad']} (manage.py verify; retention removes them)."
            )
        if result["under_way"]:
            lines.append(
                f"Backup run(s) {result['under_way']} still under way encrypt with key {result['from_key']}: "
                "run reencrypt again once they have finished."
            )
        if result["wal_writing"]:
            lines.append(
                f"A WAL ingest still under way encrypts segments with key {result['from_key']}: "
                "run reencrypt again once it has finished."
            )
        if result["exit_code"]:
            lines.append(f"Some copies are still on key {result['from_key']}: fix the above and run reencrypt again.")
        return lines
