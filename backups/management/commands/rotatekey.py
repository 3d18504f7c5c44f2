"""Switch new backups to a new key: manage.py rotatekey (--passphrase-file NEW | --recipients ID,...)."""

from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.osuser import os_actor
from backups import keyring
from backups.crypto import EncryptionError


class Command(PortalCommand):
    help = (
        "Make a new encryption key current: new backups (and WAL) are encrypted with it. The old key stays in "
        "the keyring (KEYRING_DIR) under its key id while any kept artifact needs it; re-encrypt those with "
        "manage.py reencrypt --from-key KEYID to retire it sooner. The passphrase is read from the file, "
        "never from the command line."
    )

    def add_arguments(self, parser):
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--passphrase-file", help="a file (mode 0600) holding the new passphrase")
        which.add_argument(
            "--recipients", help="comma-separated GPG key ids or fingerprints (public keys in GNUPGHOME)"
        )

    def run(self, passphrase_file=None, recipients=None, **options):
        listed = [r.strip() for r in (recipients or "").split(",") if r.strip()]
        if recipients is not None and not listed:
            fail("--recipients names no key: give comma-separated key ids or fingerprints")
        try:
            key = keyring.rotate(passphrase_file=passphrase_file, recipients=listed, actor=os_actor())
        except EncryptionError as e:
            fail(str(e))
        return {"key_id": key.pk, "kind": key.kind, "recipients": key.recipient_list}

    def describe(self, result):
        return [
            f"Key {result['key_id']} ({result['kind']}) is now current: new backups are encrypted with it.",
            "Keep a copy of the keyring (KEYRING_DIR) where you keep your passphrases; older keys stay in it "
            "while kept backups need them.",
        ]
