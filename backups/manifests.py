"""Signed manifests beside every artifact: what a fresh portal rebuilds its catalog from.

When the portal's host burns, its catalog (servers, runs, copies, WAL segments, chains) is gone
with its database, but the artifacts are still on the NAS and in S3. Beside each of them the
portal keeps a manifest: what the catalog knew of it (server and identity, kind, times, LSNs,
timeline, parent, size, sha256, row counts, key id). `manage.py rebuildcatalog` reads them back
(backups.rebuild).

One file per manifest, SOMETHING.manifest.json.gpg, encrypted like the artifacts (the metadata
names databases, tables and row counts) and holding a JSON envelope:
{"format": 1, "manifest": "<the manifest's JSON text>", "signature": "<armored detached
signature of that text by the portal's signing key>"}. The text is signed as it is, without a
trailing newline, so a stock check is
`gpg -d F | jq -j .manifest > m.json; gpg -d F | jq -j .signature > m.asc; gpg --verify m.asc m.json`
with the portal's public key (signing-public.asc) imported. A portal holding only that public
half verifies manifests and can refuse a forged one; the passphrase alone can write a manifest
that decrypts, never one that verifies.

Re-encryption (backups.reencrypt) gives a copy a new object, KEY.kKEYID.gpg, with another sha256,
and leaves the manifests naming the old one: beside the new object it writes a signed note,
NEWKEY.reencrypted.json (not encrypted: it holds object names and hashes only, like a listing),
saying which object it replaces and the new one's size and sha256. A rebuild follows the notes
from what a manifest names to where the file is now, and refuses a note that does not verify.

A run's manifest is written when the run succeeds, as the run's "signed_manifest" artifact, and
goes to every tier with the run's other artifacts (backups.copies). WAL has one manifest per
ingest pass (not per segment: a signature and a key derivation per segment would halve the
ingest), written to the WAL location and put on every other tier at once; a tier that refuses it
is tried again by the next pass (VAR_DIR/walmanifests/pending). A pass killed before its manifest
leaves its segments to the next pass's manifest (VAR_DIR/walmanifests/SERVER.covered).
"""

import hashlib
import io
import json
from datetime import datetime
from pathlib import Path

import psycopg
from django.conf import settings
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from backupportal.lib import signing
from backups import keyring
from backups.crypto import Encryption, EncryptionError, gpg_failure, keyring_dir
from backups.logical import primary_location
from backups.models import BackupCopy, BackupRun, StorageLocation, WalSegment
from backups.pipeline import BackupFailed, encrypt_bytes
from backups.storage import MissingArtifact, StorageError, store_for

FORMAT = 1
SUFFIX = ".manifest.json.gpg"
NOTE_SUFFIX = ".reencrypted.json"  # beside a re-encrypted object (see the docstring)
ARTIFACT = "signed_manifest"  # BackupCopy.artifact of a run's manifest
# A WAL manifest names at most this many segments (~300 bytes each); the rest go in the next.
MAX_WAL_ENTRIES = 10000
# Fields of a run a rebuilt catalog needs back as they were.
RUN_FIELDS = [
    "id",
    "kind",
    "trigger",
    "requested_by",
    "key",
    "size",
    "sha256",
    "notes",
    "timeline",
    "start_lsn",
    "end_lsn",
    "start_wal",
    "end_wal",
]
RUN_TIMES = ["created_at", "started_at", "finished_at"]


class ManifestRefused(Exception):
    """A manifest that cannot be trusted (unreadable, not signed by the key given, altered)."""


# --- What a manifest says. -----------------------------------------------------------------


def stamp(moment):
    return timezone.localtime(moment).strftime("%Y%m%dT%H%M%S%z")


def run_key(run):
    """Beside the run's artifacts, with their stem: SERVER/KIND/STAMP-ID.manifest.json.gpg."""
    return f"{run.server.name}/{run.kind}/{stamp(run.created_at)}-{run.pk}{SUFFIX}"


def wal_batch_key(server, first, moment):
    return f"{server.name}/wal/manifests/{stamp(moment)}-{first}{SUFFIX}"


def system_identifier(server):
    """The cluster's system identifier (pg_control_system()), or "" when it cannot be read now:
    a manifest is never held back by it."""
    try:
        with server.connect() as conn:
            return str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
    except (psycopg.Error, BackupFailed, OSError):
        return ""


def known_system_identifier(server):
    """The identifier the newest run recorded (WAL ingest does not connect to the server for it)."""
    recorded = server.runs.good().filter(details__has_key="system_identifier").order_by("-finished_at")
    return next((r.details["system_identifier"] for r in recorded[:5] if r.details["system_identifier"]), "")


def identity(server, sysid):
    """Who the artifacts are of: enough to register the server again (never its password)."""
    return {
        "name": server.name,
        "dsn": server.dsn,
        "database": server.dbname,
        "system_identifier": sysid,
        "pg_version": server.pg_version,
        "major": server.pg_version // 10000 if server.pg_version else None,
        "wal_segment_size": server.wal_segment_size,
        "archiving": server.archiving,
    }


def run_manifest(run, key):
    artifacts = [
        {"artifact": c.artifact, "key": c.key, "size": c.size, "sha256": c.sha256}
        for c in run.copies.filter(status=BackupCopy.Status.OK, location__kind=StorageLocation.Kind.PRIMARY)
        .exclude(artifact=ARTIFACT)
        .order_by("artifact")
    ]
    return {
        "format": FORMAT,
        "type": "run",
        "manifest_key": key,
        "server": identity(run.server, run.details.get("system_identifier", "")),
        "run": {field: getattr(run, field) for field in RUN_FIELDS}
        | {field: _iso(getattr(run, field)) for field in RUN_TIMES}
        | {
            "database": run.database.name if run.database_id else "",
            "parent": run.parent_run_id,
            "row_counts": run.details.get("row_counts"),
            "encryption": run.details.get("encryption", ""),
            "key_id": run.details.get("key_id", ""),
            "details": run.details,
        },
        "artifacts": artifacts,
    }


def wal_manifest(server, segments, key):
    """One ingest pass's segments, each with its copy in the WAL location (key, key id, hashes)."""
    stored = {
        c.wal_segment_id: c
        for c in BackupCopy.objects.filter(wal_segment__in=segments, artifact="wal", status=BackupCopy.Status.OK)
        .filter(location__kind=StorageLocation.Kind.PRIMARY)
        .select_related("location")
    }
    entries = []
    for s in segments:
        copy = stored.get(s.pk)
        if copy is None:
            continue
        entries.append(
            {
                "name": s.name,
                "timeline": s.timeline,
                "segno": s.segno,
                "size": s.size,
                "sha256": s.sha256,
                "archived_at": _iso(s.archived_at),
                "ingested_at": _iso(s.ingested_at),
                "source": s.source,
                "key": copy.key,
                "key_id": copy.key_id,
                "compression": copy.compression,
                "stored_size": copy.size,
                "stored_sha256": copy.sha256,
            }
        )
    return {
        "format": FORMAT,
        "type": "wal",
        "manifest_key": key,
        "server": identity(server, known_system_identifier(server)),
        "created_at": _iso(timezone.now()),
        "segments": entries,
    }


def _iso(moment):
    return moment.isoformat() if moment else None


def parse_time(text):
    return datetime.fromisoformat(text) if text else None


# --- Sealing and opening. ------------------------------------------------------------------


def seal(manifest: dict, field="manifest") -> bytes:
    """The envelope: the manifest's JSON text (under `field`: "selfbackup" for the portal's own
    backup, backups.selfbackup) and the portal's signature of exactly that text."""
    text = json.dumps(manifest, sort_keys=True, indent=1, default=str)
    signature = signing.sign(text.encode())
    envelope = {"format": FORMAT, field: text, "signature": signature.decode()}
    return json.dumps(envelope).encode()


def verified(envelope: bytes, field: str, public_key: str, what: str) -> dict:
    """The JSON text under `field` of a signed envelope, when its signature verifies with
    `public_key`; else ManifestRefused naming `what`."""
    try:
        parsed = json.loads(envelope)
        text, signature = parsed[field], parsed["signature"]
    except (ValueError, KeyError, TypeError):
        raise ManifestRefused(f"{what} is not a signed {field} envelope: refused") from None
    try:
        signing.verify(text.encode(), signature.encode(), public_key)
    except signing.SigningError as e:
        raise ManifestRefused(f"{what} is refused: {e}") from None
    return json.loads(text)


def unseal(plain: bytes, public_key: str, where: str) -> dict:
    """The manifest when its signature verifies with `public_key` and it says it lives at `where`;
    else ManifestRefused naming it."""
    manifest = verified(plain, "manifest", public_key, f"manifest {where}")
    if manifest.get("manifest_key") != where:
        # A genuine manifest moved elsewhere would describe artifacts that are not beside it.
        raise ManifestRefused(f"manifest {where} is refused: it was signed for {manifest.get('manifest_key')}")
    return manifest


def decrypt(data: bytes, encryption: Encryption, where: str, keyring_too=False) -> bytes:
    """The plaintext of a manifest. `keyring_too`: when `encryption` cannot open it, every key of
    KEYRING_DIR is tried (a manifest written before a rotation, read by a fresh portal)."""
    candidates = [encryption, *(_keyring_keys(encryption) if keyring_too else [])]
    for candidate in candidates:
        plain = io.BytesIO()

        def collect(chunk, plain=plain):
            plain.write(chunk or b"")
            return False

        result = candidate.decrypt_stream(io.BytesIO(data), collect)
        if result.ok:
            return plain.getvalue()
    tried = f" (tried {len(candidates)} keys: the given one and the keyring's)" if keyring_too else ""
    raise ManifestRefused(f"manifest {where} cannot be decrypted{tried}: {gpg_failure(result)}")


def _keyring_keys(given):
    """Encryptions of the keyring's keys other than `given`, as files in KEYRING_DIR."""
    ids = sorted({p.stem for p in keyring_dir().iterdir() if p.suffix in (".passphrase", ".recipients")})
    for key_id in ids:
        if key_id == given.custody_key:
            continue
        try:
            yield Encryption.of_key(key_id)
        except EncryptionError:
            continue  # unreadable or empty: the others may still open it


def _fetched(store, key, what) -> bytes:
    """The whole small object at `key` (a manifest, a note); ManifestRefused naming `what`."""
    try:
        f = store.open(key)
        try:
            return f.read()
        finally:
            f.close()
    except (StorageError, OSError) as e:
        raise ManifestRefused(f"{what} cannot be read: {e}") from None


def read(store, key, encryption, public_key, signed_for=None):
    """(manifest, size, sha256 of the stored file) of the manifest at `key` in `store`; a manifest
    re-encrypted since (a note led to `key`) still says where it was written: `signed_for`."""
    data = _fetched(store, key, f"manifest {key}")
    manifest = unseal(decrypt(data, encryption, key, keyring_too=True), public_key, signed_for or key)
    return manifest, len(data), hashlib.sha256(data).hexdigest()


# --- Re-encryption notes. --------------------------------------------------------------------


def write_note(store, replaces, key, size, sha256, encryption_key, key_id):
    """The signed note beside the re-encrypted object `key` (see the module's docstring).
    Raises SigningError, StorageError or OSError; an earlier note of that name is replaced."""
    note = {
        "replaces": replaces,
        "key": key,
        "size": size,
        "sha256": sha256,
        "encryption_key": encryption_key,
        "key_id": key_id,
        "at": timezone.now().isoformat(),
    }
    text = json.dumps(note, sort_keys=True)
    envelope = json.dumps({"format": FORMAT, "note": text, "signature": signing.sign(text.encode()).decode()})
    where = key + NOTE_SUFFIX
    if store.exists(where):
        store.delete(where)  # left by an interrupted run that wrote this very object before
    with store.writer(where) as writer:
        writer.write(envelope.encode())
        writer.commit()


def read_note(store, where, public_key):
    """The note at `where` when its signature verifies and it describes the object beside it;
    else ManifestRefused naming it."""
    what = f"re-encryption note {where}"
    note = verified(_fetched(store, where, what), "note", public_key, what)
    if note.get("key", "") + NOTE_SUFFIX != where:
        raise ManifestRefused(f"re-encryption note {where} is refused: it was signed for {note.get('key')}")
    return note


# --- Writing: a run's, when it succeeds; a WAL ingest pass's. ------------------------------


def write_for_run(run):
    """The run's manifest, encrypted and signed, into the primary location as its "signed_manifest"
    artifact (copied to the other tiers with the rest). BackupFailed when it cannot be written:
    a run no fresh portal could find again is not a good run."""
    try:
        encryption = keyring.current()  # the run's own key: custody counts the manifest as its artifact
    except EncryptionError as e:
        raise BackupFailed(str(e)) from None
    location = primary_location()
    key = run_key(run)
    run.details["keys"] = [*run.details.get("keys", []), key]  # removed with the rest if the run fails
    run.details.setdefault("system_identifier", system_identifier(run.server))
    run.finished_at = run.finished_at or timezone.now()
    try:
        sealed = seal(run_manifest(run, key))
    except signing.SigningError as e:
        raise BackupFailed(f"the run's manifest cannot be signed: {e}") from None
    size, sha256 = encrypt_bytes(store_for(location), key, sealed, encryption)
    BackupCopy.record_made(
        location, key, size, sha256, run=run, artifact=ARTIFACT, encryption_key_id=encryption.custody_key or None
    )
    return key


def write_for_wal(server, names, location, secondaries):
    """The manifest of one ingest pass (`names`, and what a pass killed before its manifest left
    uncovered), into the WAL `location` and every secondary. Returns its key (None for no
    segments). Raises StorageError, EncryptionError or SigningError: the caller leaves a marker,
    the segments themselves are archived."""
    covered = _covered(server)
    since = int(covered.read_text()) if covered.is_file() else None
    live = WalSegment.objects.filter(server=server, deleted_at=None)
    todo = live.filter(Q(name__in=names) | (Q(pk__gt=since) if since is not None else Q(pk__in=[])))
    segments = sorted(todo.order_by("pk")[:MAX_WAL_ENTRIES], key=lambda s: s.name)
    if not segments:
        return None
    key = _write_wal(server, segments, location)
    covered.write_text(str(max(s.pk for s in segments)))
    _to_every_tier(key, location, secondaries)
    return key


def _write_wal(server, segments, location):
    """The manifest of `segments` (in name order) into the WAL location; its key."""
    key = wal_batch_key(server, segments[0].name, timezone.now())
    sealed = seal(wal_manifest(server, segments, key))
    try:
        encrypt_bytes(store_for(location), key, sealed, keyring.current())  # the key a rotation made current
    except BackupFailed as e:
        raise StorageError(str(e)) from None
    return key


def _to_every_tier(key, location, secondaries):
    """A WAL manifest just written into `location` marked pending for each secondary tier, then
    published: a tier that refuses keeps its marker for the next pass."""
    for other in secondaries:
        _pending(other, key).touch()
    publish_pending(location, secondaries)


def _covered(server) -> Path:
    """VAR_DIR/walmanifests/SERVER.covered: the newest segment (by catalog id) a manifest names.
    Missing (a new VAR_DIR), only the pass's own segments are named."""
    folder = Path(settings.VAR_DIR) / "walmanifests"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder / f"{server.name}.covered"


def pending_dir(location) -> Path:
    path = Path(settings.VAR_DIR) / "walmanifests" / "pending" / location.name
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _pending(location, key) -> Path:
    return pending_dir(location) / key.replace("/", "%")


def publish_pending(source, secondaries):
    """Copy the WAL manifests a secondary tier does not have yet from `source` (the WAL location).
    A tier that refuses keeps its list for the next pass. Returns the keys still pending."""
    left = []
    for location in secondaries:
        for marker in sorted(pending_dir(location).iterdir()):
            key = marker.name.replace("%", "/")
            try:
                if store_for(location).exists(key):  # put there by an earlier pass that died before this
                    marker.unlink()
                    continue
                try:
                    original = store_for(source).open(key)
                except MissingArtifact:  # pruned by retention while the tier was down: nothing to copy
                    marker.unlink()  # (kept, it stopped every later manifest reaching that tier)
                    continue
                with original as f, store_for(location).writer(key) as out:
                    out.write(f.read())
                    out.commit()
            except (StorageError, OSError):
                left.append(f"{location.name}:{key}")
                break  # that tier is down: the next pass tries again
            marker.unlink()
    return left


# --- Retention: a WAL manifest goes once none of its segments is kept. -----------------------


def first_segment(key):
    """The first segment a WAL manifest names, from its key: STAMP-FIRST.manifest.json.gpg, or
    STAMP-FIRST.manifest.json.kKEYID.gpg once re-encrypted (and its note beside it)."""
    return key.split(".manifest.json", 1)[0].rsplit("-", 1)[-1]


def prune_wal(server, locations):
    """Delete, from every location, the WAL manifests none of whose segments is kept any more.

    Ingest goes in name order, so a pass's segments run from its first name to the next pass's
    first: a manifest goes when no live segment of the server falls in that range. The newest
    always stays. Returns the keys deleted; a tier that refuses is tried again next time."""
    passes = {}  # first segment -> the pass's objects: its manifest, re-encrypted ones, their notes
    for key in store_for(locations[0]).list(f"{server.name}/wal/manifests/"):
        passes.setdefault(first_segment(key), []).append(key)
    firsts = sorted(passes)
    deleted = []
    for first, following in zip(firsts, firsts[1:], strict=False):
        live = WalSegment.objects.filter(server=server, deleted_at=None)
        if live.filter(name__gte=first, name__lt=following).exists():
            continue
        try:
            for key in sorted(passes[first], key=lambda k: k.endswith(SUFFIX)):  # the listed name last
                for location in reversed(locations):  # the listed one last: a refusal leaves it to list again
                    _delete(store_for(location), key)
                deleted.append(key)
        except (StorageError, OSError):
            continue
    return deleted


def _delete(store, key):
    """On a locked location by version, as every copy is: a delete by key alone would only hide
    the object behind a marker, and a rebuild would find it again while it is locked. A version
    still locked refuses (ObjectLocked), and the next pass tries again."""
    version = store.surviving_version(key) if store.location.locked else ""
    store.delete(key, version)


# --- Backfill: manifests for what was backed up before manifests existed (writemanifests). ----


def runs_without_manifest():
    """Good runs with artifacts in the primary location and no manifest: taken before manifests
    existed, so a rebuilt catalog would not find them."""
    artifacts = BackupCopy.objects.filter(
        run=OuterRef("pk"), status=BackupCopy.Status.OK, location__kind=StorageLocation.Kind.PRIMARY
    ).exclude(artifact=ARTIFACT)
    manifest = BackupCopy.objects.filter(run=OuterRef("pk"), artifact=ARTIFACT)
    runs = BackupRun.objects.good().filter(Exists(artifacts)).exclude(Exists(manifest))
    return runs.select_related("server", "database").order_by("pk")


def not_in_primary(run):
    """The artifacts of `run` with no good copy in the primary location, which its manifest lists
    (run_manifest): a manifest without them would rebuild a run that cannot be restored."""
    artifacts = set(run.copies.exclude(artifact=ARTIFACT).values_list("artifact", flat=True))
    primary = run.copies.filter(status=BackupCopy.Status.OK, location__kind=StorageLocation.Kind.PRIMARY)
    return sorted(artifacts - set(primary.values_list("artifact", flat=True)))


def backfill_run(run):
    """The manifest a run taken before manifests never got, as write_for_run() writes it after a
    backup. No system identifier: the cluster's may have been initialised again since (a rebuild
    registers the server from the name and DSN)."""
    run.details.setdefault("system_identifier", "")
    key = write_for_run(run)
    BackupRun.objects.filter(pk=run.pk).update(details=run.details)  # the manifest among its keys
    return key


def wal_before_manifests(server, location):
    """Kept segments of `server` named before the first segment of any WAL manifest in `location`
    (every kept one when there is none): ingested before manifests existed. One a pass killed
    before its manifest is left to the next pass (SERVER.covered), never here."""
    firsts = [first_segment(key) for key in store_for(location).list(f"{server.name}/wal/manifests/")]
    live = WalSegment.objects.filter(server=server, deleted_at=None)
    return (live.filter(name__lt=min(firsts)) if firsts else live).order_by("name")


def backfill_wal(server, location, secondaries):
    """Manifests for those segments, MAX_WAL_ENTRIES each, on every tier; their keys.

    Each manifest's segments run from its first name up to the next manifest's first, as
    prune_wal() reads a pass, so retention removes each once none of its segments is kept."""
    segments = list(wal_before_manifests(server, location))
    keys = []
    # Newest first: when a run stops half way, the segments left lie below the lowest manifest
    # written, where the next run looks for them.
    for start in reversed(range(0, len(segments), MAX_WAL_ENTRIES)):
        keys.append(_write_wal(server, segments[start : start + MAX_WAL_ENTRIES], location))
        _to_every_tier(keys[-1], location, secondaries)  # each before the next is written
    return keys
