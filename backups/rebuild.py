"""A fresh portal's catalog, rebuilt from the signed manifests in one storage location.

`manage.py rebuildcatalog --location NAME` lists the location, decrypts every manifest
(backups.manifests) with the passphrase (or private key) at hand, refuses by name any whose
signature does not verify with the portal's public signing key, and registers again what the
rest describe: servers (never their passwords: the report says which to set), runs with their
copies in this location, databases, WAL segments with their copies, and the chains (an
incremental's parent, a logical run's globals) re-linked to the new run ids. Each artifact is
read once and its sha256 compared with the manifest's before it is catalogued; a run or segment
already in the catalog is left alone, so running it again changes nothing. A file re-encrypted
since its manifest was written is found through the signed note beside its new object
(backups.manifests), and checked against the note's sha256.

On a versioned S3 bucket (as Object Lock makes it) every version of each object is a candidate:
someone with the portal's S3 keys may have put a new version over a locked original, or a
delete marker in front of it. The versions are tried locked ones first, then newest first
(backups.s3versions): a manifest's first version that decrypts and verifies, an artifact's that
has the manifest's size and sha256, is the one read and catalogued (by its version id, which
restores read); each version passed over is reported as tampered.
"""

import hashlib
from dataclasses import dataclass, field

from django.db import transaction
from django.utils import timezone

from backupportal import journal
from backups import manifests, walkeys
from backups.manifests import ARTIFACT, NOTE_SUFFIX, SUFFIX, ManifestRefused, parse_time
from backups.models import BackupCopy, BackupRun, Database, Server, WalSegment
from backups.storage import StorageError, store_for
from backups.streams import CHUNK

# Detail fields that name another run by its id on the portal that wrote them.
RUN_REFERENCES = ("parent", "chain_base_run", "globals_from")


@dataclass
class Report:
    location: str
    dry_run: bool = False
    manifests: int = 0
    refused: list = field(default_factory=list)  # {"manifest", "why"}
    servers_created: list = field(default_factory=list)
    passwords_to_set: list = field(default_factory=list)
    runs_created: list = field(default_factory=list)  # {"id", "was", "server", "kind"}
    runs_known: int = 0
    wal_created: int = 0
    wal_known: int = 0
    skipped: list = field(default_factory=list)  # {"what", "why"}
    tampered: list = field(default_factory=list)  # versions passed over: {"key", "version", "why"}
    # When nothing was catalogued: how many manifests S3 Object Lock holds a version of.
    locked_manifests: int = 0
    unlisted: list = field(default_factory=list)  # artifacts no manifest names
    checked: int = 0  # artifacts whose sha256 was compared
    chains: dict = field(default_factory=dict)

    def as_dict(self):
        return {
            "location": self.location,
            "dry_run": self.dry_run,
            "manifests": self.manifests,
            "refused": self.refused,
            "servers_created": self.servers_created,
            "passwords_to_set": self.passwords_to_set,
            "runs_created": self.runs_created,
            "runs_already_catalogued": self.runs_known,
            "wal_created": self.wal_created,
            "wal_already_catalogued": self.wal_known,
            "sha256_checked": self.checked,
            "skipped": self.skipped,
            "tampered": self.tampered,
            "locked_manifests": self.locked_manifests,
            "unlisted": {"count": len(self.unlisted), "first": self.unlisted[:20]},
            "chains": self.chains,
        }


class Mismatch(Exception):
    """A version of an artifact that is not what its manifest (or note) says."""


class Pinned:
    """A versioned location's store whose reads by key go to the version of each key the rebuild
    reads (`reading`): the one being checked, then the one that checked out."""

    def __init__(self, store, reading):
        self.store, self.reading = store, reading

    def open(self, key, version=""):
        pinned = self.reading.get(key)
        return self.store.open(key, version or (pinned.id if pinned else ""))

    def __getattr__(self, name):
        return getattr(self.store, name)


class Rebuild:
    def __init__(self, location, encryption, public_key, dry_run=False):
        self.location, self.encryption, self.public_key = location, encryption, public_key
        self.store = store_for(location)
        self.report = Report(location.name, dry_run)
        self.run_ids = {}  # (server name, id on the old portal) -> the run here
        self.keys_present = set()
        self.moved = {}  # a key a manifest names -> the verified note of the object that replaced it
        self.note_at = {}  # a re-encrypted object's key -> its verified note
        self.seen = set()  # (server, segment) already met in this rebuild
        self.versions = {}  # on a versioned S3 bucket: key -> its Versions in reading order (S3Store.surviving)
        self.reading = {}  # key -> the Version read: being checked, then the one that checked out

    # --- Reading the location.

    def manifests(self):
        """Every manifest of the location that verifies, runs first (oldest id first), then WAL."""
        # StorageError: the location cannot be listed, said by the caller. A versioned bucket (as
        # Object Lock makes it) is read by version: a delete marker put by key alone, or a newer
        # version put over it, hides an object still locked there (first_good). The fresh portal's
        # location may not say it locks yet.
        if self.store.versioned():
            self.versions = self.store.surviving()
            self.store = Pinned(self.store, self.reading)
        keys = list(self.versions) if self.versions else list(self.store.list())
        for prefix, other in self.location.nested().items():  # signed for their own keys, not these
            keys = [key for key in keys if not key.startswith(prefix)]
            why = f"the files of location {other.name}, inside this one: rebuild them with --location {other.name}"
            self.report.skipped.append({"what": prefix, "why": why})
        self.keys_present = set(keys)
        self.moved = self.notes(keys)
        self.note_at = {note["key"]: note for note in self.moved.values()}
        runs, wal = [], []
        written = {k for k in keys if k.endswith(SUFFIX)} | {k for k in self.moved if k.endswith(SUFFIX)}
        for signed_for in sorted(written):
            key = self.now_at(signed_for)
            if key is None:
                continue  # re-encrypted, and the new object is gone too: nothing to read
            self.report.manifests += 1
            try:
                manifest, size, sha256 = self.read_manifest(key, signed_for)
            except ManifestRefused as e:
                self.report.refused.append({"manifest": key, "why": str(e)})
                continue
            (runs if manifest.get("type") == "run" else wal).append((key, manifest, size, sha256))
        runs.sort(key=lambda m: (m[1]["server"]["name"], m[1]["run"]["id"]))
        wal.sort(key=lambda m: (m[1]["server"]["name"], m[1]["created_at"]))
        return runs, wal

    def notes(self, keys):
        """The re-encryption notes that verify, by the key they replace; the others refused by name."""
        moved = {}
        for where in (k for k in keys if k.endswith(NOTE_SUFFIX)):
            try:
                note = self.read_note(where)
            except ManifestRefused as e:
                self.report.refused.append({"manifest": where, "why": str(e)})
                continue
            moved[note["replaces"]] = note
        return moved

    def read_manifest(self, key, signed_for):
        """(manifest, size, sha256) of the first version of the manifest at `key` that decrypts and
        verifies; ManifestRefused when none does."""
        return self.first_good(
            key, lambda _version: manifests.read(self.store, key, self.encryption, self.public_key, signed_for)
        )

    def read_note(self, where):
        """The first version of the re-encryption note at `where` that verifies; ManifestRefused when none does."""
        return self.first_good(where, lambda _version: manifests.read_note(self.store, where, self.public_key))

    def first_good(self, key, check):
        """What `check(version)` returns for the first version of `key` that checks out, trying
        them in S3Store.surviving's order (locked ones first, then newest first); that version is
        read from then on, and those passed over are reported (passed_over). Where the location is
        read by key, one try. When none checks out, the first one's refusal, saying how many failed."""
        failed = {}
        for version in self.versions.get(key) or [None]:
            self.pin(key, version)
            try:
                found = check(version)
            except (ManifestRefused, Mismatch) as e:
                failed[version] = e
                continue
            self.passed_over(key, version, failed, check)
            return found
        first = next(iter(failed.values()))
        if len(failed) > 1:
            raise type(first)(f"{first} (and {len(failed) - 1} other version(s) of it, none checking out)")
        raise first

    def passed_over(self, key, chosen, failed, check):
        """Report as tampered each version of `key` that failed before `chosen` checked out, and each
        newer one (what a read by key alone would get) that does not check out either: put there
        by someone with the bucket's keys. A newer one that checks out too holds the same thing."""
        for version in self.versions.get(key, []):
            if version.rank < chosen.rank and version not in failed:
                self.pin(key, version)
                try:
                    check(version)
                except (ManifestRefused, Mismatch) as e:
                    failed[version] = e
        self.pin(key, chosen)
        for version, why in failed.items():
            self.report.tampered.append({"key": key, "version": version.id, "why": str(why)})

    def pin(self, key, version):
        if version is None:
            self.reading.pop(key, None)
        else:
            self.reading[key] = version

    def now_at(self, key):
        """Where the file a manifest names as `key` is now: the newest object here that the notes
        lead to (re-encrypted once or more; the old one may still be here, held by an S3 lock),
        else `key` itself; None when none of them is here."""
        found, seen = (key if key in self.keys_present else None), set()
        while key in self.moved and key not in seen:
            seen.add(key)
            key = self.moved[key]["key"]
            found = key if key in self.keys_present else found
        return found

    def located(self, key, size, sha256):
        """(why the file a manifest names does not check out or "", (key, size, sha256) where it is now).
        A re-encrypted file is checked against its note instead of the manifest."""
        now = self.now_at(key)
        if now is not None and now != key:
            note = self.note_at[now]
            key, size, sha256 = now, note["size"], note["sha256"]
        return self.hashed(key, size, sha256), (key, size, sha256)

    def data_key_of(self, key, key_id):
        """The WAL data key a segment's object is encrypted with: the note's when re-encrypted."""
        note = self.note_at.get(key)
        return note["key_id"] if note is not None else key_id

    def hashed(self, key, size, sha256):
        """Why no version of the file at `key` matches the manifest, or "" when one does (that one
        is read, and catalogued, from then on)."""
        if key not in self.keys_present:
            return f"{key} is missing from location {self.location.name}"
        try:
            self.first_good(key, lambda version: self.matches(key, version, size, sha256))
        except Mismatch as e:
            return str(e)
        return ""

    def matches(self, key, version, size, sha256):
        """Mismatch unless `key` as read now (`version`, when the bucket keeps them) has `size` and `sha256`."""
        if version is not None and version.size != size:  # listed: no need to read it
            raise Mismatch(f"{key} version {version.id} is {version.size} bytes, its manifest says {size}")
        digest, length = hashlib.sha256(), 0
        try:
            with self.store.open(key) as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    length += len(chunk)
        except (StorageError, OSError) as e:
            raise Mismatch(f"{key} cannot be read: {e}") from None
        self.report.checked += 1
        if (length, digest.hexdigest()) != (size, sha256):
            raise Mismatch(
                f"{key} does not match its manifest (sha256 {digest.hexdigest()[:12]}, manifest {sha256[:12]})"
            )

    def lock_of(self, key):
        """The copy's S3 version and lock on a versioned bucket (reads and deletes go by version,
        and retention never asks S3 to delete an object it still locks), else nothing."""
        version = self.reading.get(key)
        if version is None or version.id == "null":
            return {}
        try:
            return {"version_id": version.id, "retain_until": self.store.lock_of(key, version.id)["retain_until"]}
        except StorageError:
            return {"version_id": version.id}  # retention learns the lock when S3 refuses the delete

    # --- Servers.

    def server(self, identity):
        server = Server.objects.filter(name=identity["name"]).first()
        if server is None:
            server = Server(
                name=identity["name"],
                dsn=identity["dsn"],
                pg_version=identity.get("pg_version"),
                wal_segment_size=identity.get("wal_segment_size"),
                archiving=identity.get("archiving") or Server.Archiving.NONE,
            )
            server.save()
            self.report.servers_created.append(server.name)
        elif not server.wal_segment_size and identity.get("wal_segment_size"):
            server.wal_segment_size = identity["wal_segment_size"]
            server.save(update_fields=["wal_segment_size"])
        if not server.password and server.name not in self.report.passwords_to_set:
            self.report.passwords_to_set.append(server.name)
        return server

    # --- Runs.

    def run(self, key, manifest, size, sha256):
        was = manifest["run"]
        known = BackupCopy.objects.filter(artifact=ARTIFACT, key=key, run__isnull=False).select_related("run").first()
        if known is not None:
            self.run_ids[(manifest["server"]["name"], was["id"])] = known.run
            self.report.runs_known += 1
            self.add_copy(known.run, ARTIFACT, key, size, sha256)
            return
        found = {}  # the key each artifact had when the manifest was written -> where it is now
        for artifact in manifest["artifacts"]:
            problem, found[artifact["key"]] = self.located(artifact["key"], artifact["size"], artifact["sha256"])
            if problem:
                self.report.skipped.append({"what": f"run #{was['id']} ({key})", "why": problem})
                return
        server = self.server(manifest["server"])
        run = BackupRun(
            server=server,
            database=Database.objects.get_or_create(server=server, name=was["database"])[0]
            if was["database"]
            else None,
            status=BackupRun.Status.SUCCEEDED,
            details=self.relinked(server, was, key, found, manifest["manifest_key"]),
            bytes_done=was["size"] or 0,
            key=found.get(was["key"], (was["key"] or "",))[0],
            **{f: was[f] or "" for f in ("kind", "trigger", "requested_by", "sha256", "notes")},
            **{f: was[f] for f in ("size", "timeline")},
            **{f: was[f] or "" for f in ("start_lsn", "end_lsn", "start_wal", "end_wal")},
            **{f: parse_time(was[f]) for f in manifests.RUN_TIMES},
        )
        run.save()
        self.run_ids[(server.name, was["id"])] = run
        for artifact in manifest["artifacts"]:
            self.add_copy(run, artifact["artifact"], *found[artifact["key"]])
        self.add_copy(run, ARTIFACT, key, size, sha256)
        self.report.runs_created.append({"id": run.pk, "was": was["id"], "server": server.name, "kind": run.kind})

    def relinked(self, server, was, key, found, signed_for):
        """The run's details with the ids of other runs turned into this catalog's ids (a parent not
        rebuilt is dropped, and said: nothing restores past a missing link), and its files' keys
        where they are now (re-encrypted since, under the manifest's own key too)."""
        details = dict(was["details"])
        if isinstance(details.get("keys"), list):
            moved = {k: where[0] for k, where in found.items()} | {signed_for: key}
            details["keys"] = [moved.get(k, k) for k in details["keys"]]
        for name in RUN_REFERENCES:
            if details.get(name) is not None:
                details[name] = self.new_id(server, details[name], was, name)
        if isinstance(details.get("globals"), dict) and details["globals"].get("run") is not None:
            details["globals"] = {
                **details["globals"],
                "run": self.new_id(server, details["globals"]["run"], was, "globals"),
            }
        details["rebuilt"] = {
            "location": self.location.name,
            "manifest": key,
            "was": was["id"],
            "at": timezone.now().isoformat(),
        }
        return details

    def new_id(self, server, old, was, what):
        run = self.run_ids.get((server.name, old))
        if run is None:
            self.report.skipped.append(
                {
                    "what": f"{what} of run #{was['id']}",
                    "why": f"run #{old} it names has no manifest that verifies here",
                }
            )
            return None
        return run.pk

    def add_copy(self, run, artifact, key, size, sha256):
        BackupCopy.objects.get_or_create(
            run=run,
            location=self.location,
            artifact=artifact,
            defaults={"key": key, "size": size, "sha256": sha256, "status": BackupCopy.Status.OK, "attempts": 1}
            | {"copied_at": timezone.now(), **self.lock_of(key)},
        )

    # --- WAL.

    def wal(self, key, manifest):
        server = self.server(manifest["server"])
        keys_ok = {}
        for entry in manifest["segments"]:
            if (server.name, entry["name"]) in self.seen:
                continue  # named by an earlier pass's manifest too (after a killed pass): counted there
            self.seen.add((server.name, entry["name"]))
            if WalSegment.objects.filter(server=server, name=entry["name"], deleted_at=None).exists():
                self.report.wal_known += 1
                continue
            problem, (stored, size, sha256) = self.located(entry["key"], entry["stored_size"], entry["stored_sha256"])
            key_id = self.data_key_of(stored, entry["key_id"])
            problem = problem or self.wal_key_missing(server, key_id, keys_ok)
            if problem:
                self.report.skipped.append({"what": f"WAL {entry['name']} of {server} ({key})", "why": problem})
                continue
            segment, _ = WalSegment.objects.update_or_create(
                server=server,
                name=entry["name"],
                defaults={
                    **{f: entry[f] for f in ("timeline", "segno", "size", "sha256", "source")},
                    "key": stored,
                    "archived_at": parse_time(entry["archived_at"]),
                    "ingested_at": parse_time(entry["ingested_at"]),
                    "deleted_at": None,
                },
            )
            BackupCopy.objects.update_or_create(
                wal_segment=segment,
                location=self.location,
                defaults={"artifact": "wal", "key": stored, "size": size}
                | {"sha256": sha256, "status": BackupCopy.Status.OK, "attempts": 1}
                | {"key_id": key_id, "compression": entry["compression"], "copied_at": timezone.now()}
                | self.lock_of(stored),
            )
            self.report.wal_created += 1

    def wal_key_missing(self, server, key_id, checked):
        """The WAL data key a segment needs must be beside the WAL here (walkeys): else it cannot be read."""
        if not key_id:
            return ""
        if key_id not in checked:
            where = walkeys.tier_key(server.name, key_id)
            checked[key_id] = "" if where in self.keys_present else f"its WAL key file {where} is missing here"
        return checked[key_id]

    # --- The whole of it.

    def locked_manifests(self):
        """How many manifests S3 holds a version of under Object Lock (any, expired too): asked when
        nothing was catalogued, which must then not pass for a location with nothing to rebuild."""
        return sum(
            any(v.locked or self.store.lock_of(key, v.id)["retain_until"] for v in versions)
            for key, versions in self.versions.items()
            if key.endswith(SUFFIX)
        )

    def unlisted(self, named):
        """Artifacts in the location that no verified manifest names (keys, anchors and manifests aside)."""
        for key in sorted(self.keys_present - named):
            if key.endswith((SUFFIX, NOTE_SUFFIX)) or "/wal/keys/" in key or key.startswith(("anchors/", "journal")):
                continue
            self.report.unlisted.append(key)

    def execute(self):
        runs, wal = self.manifests()
        named = set()
        with transaction.atomic():
            for key, manifest, size, sha256 in runs:
                self.run(key, manifest, size, sha256)
                named |= {key} | {k for a in manifest["artifacts"] for k in (a["key"], self.now_at(a["key"]))}
            for key, manifest, _size, _sha256 in wal:
                self.wal(key, manifest)
                named |= {key} | {k for e in manifest["segments"] for k in (e["key"], self.now_at(e["key"]))}
            self.unlisted(named)
            self.report.chains = chains_summary({m["server"]["name"] for _, m, *_ in runs + wal})
            report = self.report
            if not (report.runs_created or report.runs_known or report.wal_created or report.wal_known):
                report.locked_manifests = self.locked_manifests()
            if self.report.dry_run:
                transaction.set_rollback(True)
        return self.report


def chains_summary(server_names):
    """Per server: the full base backups a PITR can start from and the incrementals on each."""
    summary = {}
    for server in Server.objects.filter(name__in=server_names):
        chains = server.runs.all().chains()
        summary[server.name] = [
            {"full": c.full.pk if c.full else None, "incrementals": [r.pk for r in c.incrementals]} for c in chains
        ]
    return summary


def rebuild(location, encryption, public_key, dry_run=False, actor="system"):
    """Rebuild the catalog from `location`'s manifests; the Report. Journaled unless a dry run."""
    report = Rebuild(location, encryption, public_key, dry_run).execute()
    if not dry_run:
        journal.record(
            "catalog_rebuilt",
            actor=actor,
            outcome="failed" if report.refused or report.locked_manifests else "ok",
            location=location.name,
            manifests=report.manifests,
            runs=len(report.runs_created),
            # Each run it made, by id: they have no backup_succeeded entry of their own, and the
            # evidence pack's cross-check (watching.evidence_rows) vouches for them by this one.
            run_ids=[made["id"] for made in report.runs_created],
            wal=report.wal_created,
            servers=report.servers_created,
            skipped=len(report.skipped),
            # Versions put over (or hidden behind) what the manifests vouch for: by whom has the S3 keys.
            tampered=len(report.tampered),
            tampered_first=report.tampered[:20],
            locked_manifests=report.locked_manifests,
        )
        for refused in report.refused:
            journal.record("manifest_refused", actor=actor, outcome="failed", location=location.name, **refused)
    return report
