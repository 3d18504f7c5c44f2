"""A fresh portal's catalog from the signed manifests of one location:
manage.py rebuildcatalog --location NAME [--dry-run] [--json] [--public-key FILE]."""

from pathlib import Path

from backupportal.lib import signing
from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.osuser import os_actor
from backups.crypto import Encryption, EncryptionError
from backups.models import StorageLocation
from backups.rebuild import rebuild
from backups.storage import StorageError


class Command(PortalCommand):
    help = (
        "Rebuild the catalog (servers, runs, copies, WAL segments, chains) from the signed manifests in one storage "
        "location: after the portal's host was lost. Needs the passphrase file (or the private key) the backups were "
        "encrypted with and the portal's public signing key; refuses any manifest whose signature does not verify."
    )

    def add_arguments(self, parser):
        parser.add_argument("--location", required=True, help="the storage location to read (see the admin)")
        parser.add_argument("--dry-run", action="store_true", help="read and check everything, catalogue nothing")
        parser.add_argument(
            "--public-key",
            action="append",
            help="the portal's signing-public.asc, kept with the restore keys (default: SIGNING_KEY_DIR's own); "
            "give it again for each key the portal has signed with (a portal rebuilt before made a new one)",
        )

    def run(self, location, dry_run=False, public_key=None, **options):
        where = StorageLocation.objects.filter(name=location).first()
        if where is None:
            names = ", ".join(StorageLocation.objects.values_list("name", flat=True)) or "none"
            fail(
                f"no storage location named {location} (there are: {names}): define it first (S3_BUCKET and the "
                "other S3_ settings, then manage.py migrate; or the admin's Storage locations)"
            )
        try:
            encryption = Encryption()
        except EncryptionError as e:
            fail(f"{e}: the manifests are encrypted like the backups")
        try:
            report = rebuild(where, encryption, self.public_key(public_key), dry_run=dry_run, actor=os_actor())
        except StorageError as e:
            fail(f"cannot list location {location}: {e}")
        result = report.as_dict()
        if report.tampered:
            # Not a failure: the genuine versions were catalogued. But whoever put these holds the S3 keys.
            names = ", ".join(f"{t['key']} (version {t['version']})" for t in report.tampered[:5])
            self.stderr.write(
                f"rebuildcatalog: {len(report.tampered)} object version(s) in location {location} passed over as "
                f"tampered, e.g. {names}: someone with the portal's S3 keys wrote them; replace those keys"
            )
        if report.refused:
            names = ", ".join(r["manifest"] for r in report.refused)
            self.stderr.write(
                f"rebuildcatalog: {len(report.refused)} manifest(s) refused, nothing of them catalogued: {names}"
            )
            result["exit_code"] = 1
        elif report.locked_manifests:
            self.stderr.write(
                f"rebuildcatalog: nothing catalogued, although S3 Object Lock holds a version of "
                f"{report.locked_manifests} manifest(s) in location {location}: see what was skipped"
            )
            result["exit_code"] = 1
        return result

    def public_key(self, paths):
        """The armored public keys given, one after the other: a manifest signed by any of them verifies."""
        texts = []
        for path in [Path(p) for p in paths or [signing.public_key_path()]]:
            if not path.is_file():
                fail(
                    f"no public signing key at {path}: give --public-key FILE (the signing-public.asc kept with the "
                    "restore keys); without it no manifest can be trusted"
                )
            text = path.read_text(errors="replace")
            if "BEGIN PGP PUBLIC KEY BLOCK" not in text:
                fail(f"{path} is not an armored OpenPGP public key: give the portal's signing-public.asc")
            texts.append(text)
        return "\n".join(texts)

    def describe(self, result):
        verb = "Would rebuild" if result["dry_run"] else "Rebuilt"
        lines = [
            f"{verb} the catalog from location {result['location']}: {result['manifests']} manifest(s), "
            f"{len(result['runs_created'])} run(s) and {result['wal_created']} WAL segment(s) catalogued, "
            f"{result['runs_already_catalogued']} run(s) and {result['wal_already_catalogued']} segment(s) already "
            f"there, {result['sha256_checked']} sha256 checked."
        ]
        lines += [f"  server {name} registered" for name in result["servers_created"]]
        lines += [f"  run #{r['id']} ({r['server']} {r['kind']}, was #{r['was']})" for r in result["runs_created"]]
        lines += [f"  refused: {r['why']}" for r in result["refused"]]
        lines += [f"  skipped {s['what']}: {s['why']}" for s in result["skipped"]]
        lines += [
            f"  passed over as tampered: {t['key']} version {t['version']}: {t['why']}" for t in result["tampered"]
        ]
        if result["unlisted"]["count"]:
            lines.append(
                f"  {result['unlisted']['count']} file(s) no manifest names were left out, e.g. {result['unlisted']['first'][0]}"
            )
        for name in result["passwords_to_set"]:
            lines.append(
                f"  set the password of server {name} (admin: Servers, {name}, new password) before backing it up"
            )
        return lines
