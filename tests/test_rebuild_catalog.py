"""The portal's host burns: a fresh portal rebuilds its catalog from the signed manifests in S3.

Real clusters, real gpg, the moto S3 server over HTTP. The disaster is simulated the hard way:
every row of the catalog is deleted, the primary and NAS directories are emptied, and the portal
gets a new, empty VAR_DIR and signing-key directory (its WAL keys, its private signing key and
its in-memory key caches gone); only the passphrase file and the public signing key survive.
"""

import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from backupportal.lib import signing
from backupportal.lib.osuser import free_port
from backupportal.models import JournalEntry
from backups import keyring, manifests, walingest, walkeys
from backups.crypto import Encryption
from backups.models import (
    BackupCopy,
    BackupRun,
    BackupSchedule,
    Database,
    Server,
    StorageLocation,
    Verification,
    WalSegment,
)
from backups.storage import StorageError, store_for
from restores.models import RestoreRequest, RestoreRun, RestoreTest, ValidationCheck
from tests.helpers import (
    DB,
    a_second_later,
    enable_push,
    pitr,
    pitr_to,
    push_with_base,
    rows,
    run_command,
    stop_gpg_agent,
    switch_wal,
    wait_archived,
    write,
)

pytest_plugins = ["tests.walfixtures"]

TABLES = ["users", "audit_logs", "financial_records"]


@pytest.fixture
def signing_dir(settings, tmp_path):
    settings.SIGNING_KEY_DIR = tmp_path / "signing"
    yield settings.SIGNING_KEY_DIR
    for home in (tmp_path / "signing", tmp_path / "thief", tmp_path / "earlier"):
        stop_gpg_agent(home)


def fingerprints(port, dbname=DB):
    """Each sample table's rows, hashed in a stable order: what "restored identically" compares."""
    return {
        table: rows(port, f"SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t", dbname)
        for table in TABLES
    }


def keep_public_key(tmp_path):
    """What the operator kept with the restore keys: the public half only."""
    signing.ensure_key()
    path = tmp_path / "restore-keys" / "signing-public.asc"
    path.parent.mkdir(exist_ok=True)
    path.write_text(signing.public_key())
    return path


@pytest.fixture
def burn_the_host(settings, tiers):
    """The catalog, the local tiers and VAR_DIR gone; a fresh portal on the same settings, whose
    migrate defines the locations that the environment (S3_BUCKET ...) describes."""
    made = []

    def burn():
        for model in (ValidationCheck, RestoreTest, RestoreRun, RestoreRequest, Verification, BackupCopy):
            model.objects.all().delete()
        for model in (BackupRun, WalSegment, Database, BackupSchedule, Server, StorageLocation):
            model.objects.all().delete()
        for root in (tiers.primary, tiers.nas):
            for entry in Path(root).iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        made.append(Path(tempfile.mkdtemp(prefix="bp-fresh-var-")))
        made[-1].chmod(0o755)  # as tests/settings.py makes VAR_DIR: the postgres OS user traverses it
        settings.VAR_DIR, settings.SIGNING_KEY_DIR, settings.GNUPGHOME = made[-1], made[-1] / "signing", ""
        for cache in (walkeys._unwrapped, walkeys._current, walkeys._published, walkeys._failed):
            cache.clear()  # a new process knows no key
        StorageLocation.sync_from_settings()

    yield burn
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def s3_manifests(tiers, kind):
    store = store_for(StorageLocation.objects.get(name="s3"))
    return [k for k in store.list() if k.endswith(manifests.SUFFIX) and f"/{kind}/" in k]


def rewrite_on_s3(tiers, key, change):
    """Decrypt the object, change its plaintext, encrypt it again with the passphrase, put it back."""
    location = StorageLocation.objects.get(name="s3")
    store = store_for(location)
    with store.open(key) as f:
        plain = manifests.decrypt(f.read(), Encryption(), key)
    changed = change(plain)
    out = io.BytesIO()
    Encryption().encrypt_stream(io.BytesIO(changed), lambda chunk: out.write(chunk or b"") and False)
    store.delete(key)
    with store.writer(key) as w:
        w.write(out.getvalue())
        w.commit()


def test_a_fresh_portal_rebuilds_from_s3_alone_and_restores_pitr_and_logical(
    server, sample_cluster, passphrase_file, tiers, wal_spool, restored, signing_dir, settings, tmp_path, burn_the_host
):
    enable_push(sample_cluster)
    source = fingerprints(sample_cluster.port)
    logical = run_command("backup", "maldives", "--kind", "logical")
    assert logical["status"] == "succeeded", logical
    base = run_command("backup", "maldives", "--kind", "base")
    assert base["status"] == "succeeded", base
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    target = a_second_later()
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    walingest.ingest(server)
    segments = WalSegment.objects.filter(server=server).count()
    assert not BackupCopy.objects.filter(location__kind="s3").exclude(status="ok").exists()
    # Every run has its manifest on every tier, WAL one per ingest pass (fewer than the segments).
    for run in BackupRun.objects.all():
        assert set(run.copies.filter(artifact=manifests.ARTIFACT).values_list("location__kind", "status")) == {
            ("primary", "ok"),
            ("nas", "ok"),
            ("s3", "ok"),
        }
    wal_manifests = s3_manifests(tiers, "wal")
    assert 1 <= len(wal_manifests) < segments
    public = keep_public_key(tmp_path)

    burn_the_host()
    assert not Server.objects.exists() and not (settings.VAR_DIR / "walkeys").exists()
    rebuilt = run_command("rebuildcatalog", "--location", "s3", "--public-key", str(public))
    assert rebuilt["_exit"] == 0, rebuilt
    assert rebuilt["refused"] == [] and rebuilt["skipped"] == [] and rebuilt["tampered"] == [], rebuilt
    assert rebuilt["servers_created"] == ["maldives"] and rebuilt["passwords_to_set"] == ["maldives"]
    assert sorted(r["kind"] for r in rebuilt["runs_created"]) == ["base", "logical"]
    assert rebuilt["wal_created"] == segments
    assert rebuilt["sha256_checked"] == 4 + segments  # dump, globals, base tar, backup_manifest, each segment
    assert rebuilt["unlisted"]["count"] == 0
    server = Server.objects.get(name="maldives")
    assert server.pg_version and server.wal_segment_size and server.archiving == "push"
    new_base = BackupRun.objects.get(kind="base")
    assert new_base.start_wal and new_base.end_lsn and new_base.details["rebuilt"]["was"] == base["id"]
    assert rebuilt["chains"] == {"maldives": [{"full": new_base.pk, "incrementals": []}]}
    assert set(BackupCopy.objects.values_list("location__name", flat=True)) == {"s3"}
    assert JournalEntry.objects.filter(action="catalog_rebuilt").count() == 1
    made = JournalEntry.objects.get(action="catalog_rebuilt").details["run_ids"]  # the evidence pack vouches by it
    assert sorted(made) == sorted(BackupRun.objects.values_list("pk", flat=True)) and new_base.pk in made

    again = run_command("rebuildcatalog", "--location", "s3", "--public-key", str(public))
    assert again["_exit"] == 0 and again["runs_created"] == [] and again["wal_created"] == 0, again
    assert again["runs_already_catalogued"] == 2 and again["wal_already_catalogued"] == segments
    assert (BackupRun.objects.count(), WalSegment.objects.count()) == (2, segments)
    assert BackupCopy.objects.count() == 2 + 4 + segments  # two signed manifests, four artifacts, the WAL

    datadir, port = restored(), free_port()
    result = pitr_to(datadir, port, target)
    assert result["status"] == "succeeded", result
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",)]

    new_logical = BackupRun.objects.get(kind="logical")
    restore = run_command("restore", str(new_logical.pk), "--into-database", "rebuilt_copy")
    assert restore["status"] == "succeeded", restore
    assert fingerprints(sample_cluster.port, "rebuilt_copy") == source


def test_a_tampered_or_forged_manifest_is_refused_by_name_and_the_rest_rebuilt(
    server, sample_cluster, passphrase_file, tiers, signing_dir, settings, tmp_path, burn_the_host
):
    first = run_command("backup", "maldives", "--kind", "logical")
    second = run_command("backup", "maldives", "--kind", "logical")
    assert first["status"] == second["status"] == "succeeded"
    public = keep_public_key(tmp_path)
    tampered, genuine = sorted(s3_manifests(tiers, "logical"), key=lambda k: int(k.split("-")[-1].split(".")[0]))

    def one_byte(plain):
        envelope = json.loads(plain)
        text = envelope["manifest"]
        at = text.index('"size": ') + len('"size": ')
        envelope["manifest"] = text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1 :]
        return json.dumps(envelope).encode()

    rewrite_on_s3(tiers, tampered, one_byte)
    # A forgery by someone with the passphrase but not the private key: signed by a key of their own.
    forged = genuine.replace(f"-{second['id']}.", "-999.")

    def forge(plain):
        manifest = json.loads(json.loads(plain)["manifest"])
        manifest["manifest_key"], manifest["run"]["id"] = forged, 999
        settings.SIGNING_KEY_DIR = tmp_path / "thief"
        try:
            return manifests.seal(manifest)
        finally:
            settings.SIGNING_KEY_DIR = signing_dir

    store = store_for(StorageLocation.objects.get(name="s3"))
    with store.open(genuine) as f, store.writer(forged) as w:
        w.write(f.read())
        w.commit()
    rewrite_on_s3(tiers, forged, forge)

    burn_the_host()
    dry = run_command("rebuildcatalog", "--location", "s3", "--public-key", str(public), "--dry-run")
    assert dry["_exit"] == 1 and dry["dry_run"] and len(dry["runs_created"]) == 1, dry
    assert not Server.objects.exists() and not BackupRun.objects.exists()
    assert not JournalEntry.objects.filter(action="catalog_rebuilt").exists()

    # The key of an earlier portal given too (one per key it signed with): the forgery is still refused.
    settings.SIGNING_KEY_DIR = tmp_path / "earlier"
    earlier = tmp_path / "earlier.asc"
    signing.ensure_key()
    earlier.write_text(signing.public_key())
    keys = ["--public-key", str(earlier), "--public-key", str(public)]
    result = run_command("rebuildcatalog", "--location", "s3", *keys)
    assert result["_exit"] == 1
    assert sorted(r["manifest"] for r in result["refused"]) == sorted([tampered, forged])
    assert all("signature does not verify" in r["why"] for r in result["refused"]), result["refused"]
    assert tampered in result["_stderr"] and forged in result["_stderr"]
    assert [r["was"] for r in result["runs_created"]] == [second["id"]]
    assert BackupRun.objects.get().details["rebuilt"]["was"] == second["id"]
    assert JournalEntry.objects.filter(action="manifest_refused").count() == 2
    # The dump the tampered manifest described is left out, and said to be.
    assert result["unlisted"]["count"] == 2  # its dump and its globals


def test_rebuildcatalog_refuses_what_it_cannot_trust_or_reach_in_one_line(
    db, passphrase_file, tiers, signing_dir, tmp_path
):
    result = run_command("rebuildcatalog", "--location", "nowhere", "--public-key", str(tmp_path / "x"))
    assert result["_exit"] == 1 and "no storage location named nowhere" in result["_stderr"]
    result = run_command("rebuildcatalog", "--location", "s3", "--public-key", str(tmp_path / "missing.asc"))
    assert result["_exit"] == 1 and "no public signing key at" in result["_stderr"]
    (tmp_path / "not-a-key.asc").write_text("hello")
    result = run_command("rebuildcatalog", "--location", "s3", "--public-key", str(tmp_path / "not-a-key.asc"))
    assert result["_exit"] == 1 and "is not an armored OpenPGP public key" in result["_stderr"]
    location = StorageLocation.objects.get(name="s3")
    location.bucket = "no-such-bucket"
    location.save()
    result = run_command("rebuildcatalog", "--location", "s3", "--public-key", str(keep_public_key(tmp_path)))
    assert result["_exit"] == 1 and "cannot list location s3" in result["_stderr"], result
    assert "\n" not in result["_stderr"].strip()


def test_wal_manifests_are_on_every_tier_cover_a_killed_pass_and_go_once_no_segment_is_kept(
    db, passphrase_file, tiers, signing_dir
):
    from django.utils import timezone

    from backups.retention import prune_wal_manifests

    server = Server.objects.create(name="gone", dsn="postgresql://backup@127.0.0.1:5432/app")
    wal = StorageLocation.objects.get(name="wal")
    secondaries = list(StorageLocation.objects.exclude(kind="primary"))
    stores = [store_for(location) for location in (wal, *secondaries)]

    def catalogue(n):
        name = f"0000000100000000000000{n:02X}"
        segment = WalSegment.objects.create(
            server=server,
            timeline=1,
            name=name,
            segno=n,
            size=16,
            sha256="0" * 64,
            key=f"gone/wal/{name}.gpg",
            archived_at=timezone.now(),
        )
        BackupCopy.record_made(wal, segment.key, 10, "1" * 64, wal_segment=segment, artifact="wal")
        return name

    def named(key):
        manifest, *_ = manifests.read(stores[0], key, Encryption(), signing.public_key())
        return [s["name"] for s in manifest["segments"]]

    batches, keys = [], []
    for numbers in ([1, 2], [3, 4], [5]):
        batches.append([catalogue(n) for n in numbers])
        keys.append(manifests.write_for_wal(server, batches[-1], wal, secondaries))
    # A pass killed before its manifest (6): the next pass's manifest names its segments too.
    killed = catalogue(6)
    batches.append([catalogue(7)])
    keys.append(manifests.write_for_wal(server, batches[-1], wal, secondaries))
    assert [named(key) for key in keys] == [*batches[:3], [killed, *batches[3]]]
    assert all(store.exists(key) for store in stores for key in keys)

    WalSegment.objects.filter(name__in=batches[0] + batches[1][:1]).update(deleted_at=timezone.now())
    assert prune_wal_manifests(server) == [keys[0]]
    assert [[store.exists(key) for key in keys] for store in stores] == [[False, True, True, True]] * 3
    WalSegment.objects.filter(server=server).update(deleted_at=timezone.now())
    assert prune_wal_manifests(server) == keys[1:3]  # the newest pass's always stays
    assert [[store.exists(key) for key in keys] for store in stores] == [[False, False, False, True]] * 3


def test_a_catalog_rebuilt_after_reencrypt_finds_every_file_through_the_signed_notes(
    server, sample_cluster, passphrase_file, tiers, wal_spool, restored, signing_dir, settings, tmp_path, burn_the_host
):
    """Rotated and re-encrypted: every file has a new name and sha256, and every manifest a new
    name, on each tier. A fresh portal with only the new passphrase and the public key gets all back."""
    from tests.test_key_custody import new_passphrase_file

    enable_push(sample_cluster)
    source = fingerprints(sample_cluster.port)
    assert run_command("backup", "maldives", "--kind", "logical")["status"] == "succeeded"
    base = run_command("backup", "maldives", "--kind", "base")
    assert base["status"] == "succeeded", base
    old = BackupRun.objects.get(pk=base["id"]).details["key_id"]
    write(sample_cluster, "CREATE TABLE probe(tx text); INSERT INTO probe VALUES ('A')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    walingest.ingest(server)
    rotated = new_passphrase_file(tmp_path)
    assert run_command("rotatekey", "--passphrase-file", str(rotated))["_exit"] == 0
    write(sample_cluster, "INSERT INTO probe VALUES ('B')")
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    walingest.ingest(server)
    moved = run_command("reencrypt", "--from-key", old)
    assert moved["status"] == "succeeded" and moved["old_removed"] == moved["reencrypted"] > 0, moved
    assert moved["wal_manifests"] >= 3  # the pass before the rotation's, on each of the three tiers
    assert keyring.drop_unneeded(actor="test") == [old]  # the old passphrase is gone for good
    segments = WalSegment.objects.filter(server=server).count()
    store = store_for(StorageLocation.objects.get(name="s3"))
    notes = {k.removesuffix(manifests.NOTE_SUFFIX) for k in store.list() if k.endswith(manifests.NOTE_SUFFIX)}
    moved_copies = set(BackupCopy.objects.filter(location__kind="s3", key__contains=".k").values_list("key", flat=True))
    assert moved_copies and moved_copies <= notes
    # Every manifest left under its first name was written after the rotation (the newer WAL pass).
    assert [k for k in store.list() if k.endswith(manifests.SUFFIX)] == [
        k for k in store.list("maldives/wal/manifests/") if k.endswith(manifests.SUFFIX)
    ]
    # Retention prunes a pass's manifest with its re-encrypted form and note: one pass, by its first segment.
    wal_objects = list(store.list("maldives/wal/manifests/"))
    assert len(wal_objects) > len({manifests.first_segment(k) for k in wal_objects}) >= 2
    assert all(re.fullmatch("[0-9A-F]{24}", manifests.first_segment(k)) for k in wal_objects), wal_objects
    # A note forged by someone without the signing key: refused by name, the genuine ones followed.
    genuine = manifests.read_note(store, sorted(notes)[0] + manifests.NOTE_SUFFIX, signing.public_key())
    settings.SIGNING_KEY_DIR = tmp_path / "thief"
    manifests.write_note(store, genuine["replaces"], "maldives/base/elsewhere.gpg", 1, "0" * 64, "", "")
    settings.SIGNING_KEY_DIR = signing_dir
    forged = "maldives/base/elsewhere.gpg" + manifests.NOTE_SUFFIX
    public = keep_public_key(tmp_path)

    burn_the_host()
    settings.BACKUP_PASSPHRASE_FILE = str(rotated)  # the old passphrase is not needed any more
    rebuilt = run_command("rebuildcatalog", "--location", "s3", "--public-key", str(public))
    assert [r["manifest"] for r in rebuilt["refused"]] == [forged], rebuilt
    assert rebuilt["skipped"] == [] and rebuilt["unlisted"]["count"] == 0, rebuilt
    assert sorted(r["kind"] for r in rebuilt["runs_created"]) == ["base", "logical"]
    assert rebuilt["wal_created"] == segments
    for run in BackupRun.objects.all():  # the run's key and its files' keys: where they are now
        assert run.key in run.details["keys"] and all(store.exists(k) for k in run.details["keys"])
        assert all(".k" in k for k in run.copies.values_list("key", flat=True))

    datadir, port = restored(), free_port()
    result = pitr(datadir, port, "--target", "latest")
    assert result["status"] == "succeeded", result
    assert rows(port, "SELECT tx FROM probe ORDER BY tx") == [("A",), ("B",)]
    restore = run_command("restore", str(BackupRun.objects.get(kind="logical").pk), "--into-database", "after_keys")
    assert restore["status"] == "succeeded", restore
    assert fingerprints(sample_cluster.port, "after_keys") == source


def test_runs_and_wal_from_before_manifests_get_them_from_writemanifests_and_are_rebuilt(
    server, sample_cluster, passphrase_file, tiers, wal_spool, signing_dir, tmp_path, burn_the_host, monkeypatch
):
    enable_push(sample_cluster)
    logical = run_command("backup", "maldives", "--kind", "logical")
    base = run_command("backup", "maldives", "--kind", "base")
    assert logical["status"] == base["status"] == "succeeded", (logical, base)
    wait_archived(sample_cluster, switch_wal(sample_cluster))
    walingest.ingest(server)
    segments = WalSegment.objects.filter(server=server).count()
    # What a portal upgraded from a version without manifests holds: no manifest anywhere.
    for copy in BackupCopy.objects.filter(artifact=manifests.ARTIFACT).select_related("location"):
        store_for(copy.location).delete(copy.key)
        copy.delete()
    for location in StorageLocation.objects.all():
        store = store_for(location)
        for key in list(store.list("maldives/wal/manifests/")):
            store.delete(key)

    # A run whose primary copy verify found bad: a manifest would rebuild it without that file.
    bad = BackupCopy.objects.get(run_id=base["id"], artifact="main", location__kind="primary")
    BackupCopy.objects.filter(pk=bad.pk).update(status="bad")
    refused = run_command("writemanifests", "--dry-run")
    assert refused["_exit"] == 1 and [r["id"] for r in refused["runs"]] == [logical["id"]], refused
    assert refused["failed"][0]["what"] == f"run #{base['id']}"
    assert "its main has no good copy in the primary location" in refused["_stderr"]
    BackupCopy.objects.filter(pk=bad.pk).update(status="ok")

    dry = run_command("writemanifests", "--dry-run")
    assert dry["_exit"] == 0 and sorted(r["id"] for r in dry["runs"]) == sorted([logical["id"], base["id"]]), dry
    assert dry["wal"] == [{"server": "maldives", "segments": segments, "manifests": ["(dry run)"]}]
    assert not BackupCopy.objects.filter(artifact=manifests.ARTIFACT).exists() and not s3_manifests(tiers, "wal")

    # A manifest per segment here (10,000 in production), and the run stopped after the first:
    # written newest first, the next run finds the rest below it.
    monkeypatch.setattr(manifests, "MAX_WAL_ENTRIES", 1)
    write_wal, calls = manifests._write_wal, []

    def fails_after_one(*args):
        calls.append(args)
        if len(calls) > 1:
            raise StorageError("the location went away")
        return write_wal(*args)

    monkeypatch.setattr(manifests, "_write_wal", fails_after_one)
    stopped = run_command("writemanifests")
    assert stopped["_exit"] == 1 and len(stopped["runs"]) == 2 and stopped["wal"] == [], stopped
    assert "WAL of maldives: the location went away" in stopped["_stderr"]
    newest = WalSegment.objects.filter(server=server).order_by("-name").first()
    assert [manifests.first_segment(k) for k in s3_manifests(tiers, "wal")] == [newest.name]
    monkeypatch.setattr(manifests, "_write_wal", write_wal)

    done = run_command("writemanifests")
    assert done["_exit"] == 0 and done["failed"] == [] and done["runs"] == [], done
    assert done["wal"][0]["segments"] == segments - 1 and len(done["wal"][0]["manifests"]) == segments - 1
    for run in BackupRun.objects.all():
        assert set(run.copies.filter(artifact=manifests.ARTIFACT).values_list("location__kind", "status")) == {
            ("primary", "ok"),
            ("nas", "ok"),
            ("s3", "ok"),
        }
    assert len(s3_manifests(tiers, "wal")) == segments
    again = run_command("writemanifests")
    assert again["_exit"] == 0 and again["runs"] == [] and again["wal"] == [], again
    assert JournalEntry.objects.filter(action="manifests_backfilled").count() == 2

    # A fresh portal finds them all.
    public = keep_public_key(tmp_path)
    burn_the_host()
    rebuilt = run_command("rebuildcatalog", "--location", "s3", "--public-key", str(public))
    assert rebuilt["_exit"] == 0 and rebuilt["refused"] == [] and rebuilt["skipped"] == [], rebuilt
    assert sorted(r["kind"] for r in rebuilt["runs_created"]) == ["base", "logical"]
    assert rebuilt["wal_created"] == segments


def test_a_rebuild_of_the_primary_leaves_the_wal_location_inside_it_to_its_own_rebuild(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, settings
):
    """Found by review: WAL_ROOT is BACKUP_ROOT/wal by default, and rebuilding from the primary
    refused every WAL manifest there ("signed for maldives/wal/...", the WAL location's own key)
    and exited 1, which reads as tampering after a host loss."""
    assert Path(settings.WAL_ROOT).parent == Path(settings.BACKUP_ROOT)
    push_with_base(sample_cluster, server)
    rebuilt = run_command("rebuildcatalog", "--location", "primary", "--dry-run")
    assert rebuilt["_exit"] == 0 and rebuilt["refused"] == [], rebuilt
    assert rebuilt["skipped"] == [
        {"what": "wal/", "why": "the files of location wal, inside this one: rebuild them with --location wal"}
    ]
    assert rebuilt["unlisted"]["count"] == 0
    wal = run_command("rebuildcatalog", "--location", "wal", "--dry-run")
    assert wal["_exit"] == 0 and wal["refused"] == [] and wal["wal_already_catalogued"] > 0, wal


def test_a_pending_manifest_pruned_from_the_wal_location_does_not_stop_the_others(settings, tiers):
    """Found by the suite: a tier's pending marker for a WAL manifest no longer in the WAL location
    (pruned by retention while the tier was down) stopped every later manifest reaching that tier,
    the publishing breaking off at the first failure."""
    wal, s3 = StorageLocation.objects.get(name="wal"), StorageLocation.objects.get(name="s3")
    for key in ("maldives/wal/manifests/20260101T000000-000000010000000000000001.manifest.json.gpg",
                "maldives/wal/manifests/20261207T000000-000000010000000000000009.manifest.json.gpg"):  # fmt: skip
        manifests._pending(s3, key).touch()
    kept = "maldives/wal/manifests/20261207T000000-000000010000000000000009.manifest.json.gpg"
    with store_for(wal).writer(kept) as out:  # only the newer one is still in the WAL location
        out.write(b"sealed")
        out.commit()
    assert manifests.publish_pending(wal, [s3]) == []
    assert store_for(s3).exists(kept) and not list(manifests.pending_dir(s3).iterdir())
