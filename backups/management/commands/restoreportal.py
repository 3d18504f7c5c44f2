"""Bring a portal back from its selfbackup: manage.py restoreportal FILE [--json].

Run on the new host with the old portal's JOURNAL_KEY_FILE, SECRETS_KEY_FILE, SIGNING_KEY_DIR
(or its signing-public.asc, --public-key) and passphrase (or GPG private key, or the keyring) in
place, the selfbackup's signed .json beside the file, DATABASE_URL naming a new, empty database,
and before any migrate (README, "Bringing the portal back"). Then verifyjournal says which journal
entries were lost with the old host, and needs --acknowledge-loss before it exits 0.
"""

from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.osuser import os_actor
from backups import portalrestore


class Command(PortalCommand):
    help = "Restore the portal's own database (catalog and journal) from a selfbackup file, on a new host."

    def add_arguments(self, parser):
        parser.add_argument(
            "file", help="the selfbackup (portal/selfbackup-*.gpg) fetched from a storage location, its .json beside it"
        )
        parser.add_argument(
            "--public-key",
            action="append",
            help="the portal's signing-public.asc, kept with the restore keys (default: SIGNING_KEY_DIR's own); "
            "give it again for each key the portal has signed with",
        )

    def run(self, file, public_key=None, **options):
        try:
            return portalrestore.restore(file, actor=os_actor(), public_keys=public_key)
        except portalrestore.RestoreRefused as e:
            fail(str(e))

    def describe(self, result):
        checked = "checked against its .sha256" if result["sha256_checked"] else "no .sha256 beside it: not checked"
        return [
            f"Restored the portal's {result['engine']} database from {result['file']}, taken {result['taken_at']} "
            f"(signature verified; sha256 {checked}): "
            f"{result['entries']} journal entries up to #{result['restored_up_to']}.",
            "Next: manage.py verifyjournal (it names the entries lost with the old host), then "
            'manage.py verifyjournal --acknowledge-loss --reason "..." once you have checked them.',
        ]
