"""WAL ingest on every tier: the WAL key travels with the WAL, and a long pass makes the offsite
copies on its way instead of at its end."""

import hashlib
import os
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from backups import tasks, walingest, walkeys, walseal
from backups.crypto import Encryption
from backups.models import BackupCopy, StorageLocation, WalSegment
from backups.walnames import WAL_FILE, WalError
from backups.walspool import spool_dir
from tests.helpers import wait_for
from tests.stock import GPG, stock
from tests.test_wal_keys import fetch, forget_keys, path_of, primary_copy, size_of, spool_segments

pytest_plugins = ["tests.walfixtures"]


def test_a_fresh_portal_recovers_a_segment_from_s3_alone_with_the_key_beside_it(
    server, passphrase_file, tiers, wal_spool, tmp_path
):
    forget_keys()
    names = spool_segments(server, 2)
    assert walingest.ingest(server).ingested == names
    copies = BackupCopy.objects.filter(wal_segment__name=names[0]).select_related("location", "wal_segment")
    assert {c.location.kind: c.status for c in copies} == {"primary": "ok", "nas": "ok", "s3": "ok"}
    assert len({c.key_id for c in copies}) == 1 and {c.compression for c in copies} == {"zstd"}
    key_id = copies[0].key_id
    (walkeys.keyring() / f"{key_id}.key.gpg").unlink()  # a new machine: only the passphrase
    forget_keys()
    s3 = copies.get(location__kind=StorageLocation.Kind.S3)
    assert fetch(s3, tmp_path) == s3.wal_segment.sha256
    assert not (walkeys.keyring() / f"{key_id}.key.gpg").exists()  # unwrapped from S3 into memory only


def test_a_long_ingest_pass_makes_the_offsite_copies_on_its_way(
    server, passphrase_file, backup_root, nas_root, wal_spool, monkeypatch
):
    StorageLocation.sync_from_settings()
    forget_keys()
    names = spool_segments(server, 4)
    monkeypatch.setattr(walingest, "COPY_EVERY", -1)  # every segment counts as a long pass
    copied_during = []
    real = walingest.copy_pending

    def watched(s, *args, **kwargs):
        copied_during.append(BackupCopy.objects.filter(location__kind="nas", status="ok").count())
        return real(s, *args, **kwargs)

    monkeypatch.setattr(walingest, "copy_pending", watched)
    assert walingest.ingest(server).ingested == names
    assert len(copied_during) > 2 and copied_during[-1] >= 2  # before the pass ended, NAS had copies
    assert BackupCopy.objects.filter(location__kind="nas", status="ok").count() == 4


def test_copies_made_on_the_way_skip_a_location_that_failed_until_its_next_attempt(
    server, passphrase_file, backup_root, nas_root, wal_spool
):
    """A pass holds the spool while it copies on its way: a NAS or S3 that is down must not hold
    it at every look (the copy worker retries it when due); the pass's end still tries them all."""
    StorageLocation.sync_from_settings()
    forget_keys()
    spool_segments(server, 2)
    walingest.ingest(server)
    nas = BackupCopy.objects.filter(location__kind="nas")
    later = timezone.now() + timedelta(minutes=5)
    nas.update(status="failed", next_attempt_at=later)
    result = walingest.IngestResult(copied_at=time.monotonic() - walingest.COPY_EVERY - 1)
    walingest.copy_on_the_way(server, result)
    assert set(nas.values_list("status", flat=True)) == {"failed"}  # not due: not tried
    assert time.monotonic() - result.copied_at < 1
    walingest.copy_pending(server)
    assert set(nas.values_list("status", flat=True)) == {"ok"}


def test_wal_archived_while_an_ingest_runs_is_taken_by_the_same_pass(
    server, passphrase_file, backup_root, wal_spool, monkeypatch
):
    forget_keys()
    first = spool_segments(server, 2)
    later = "000000010000000000000009"
    real = walingest.record

    def archive_meanwhile(*args, **kwargs):
        (spool_dir(server) / later).write_bytes(b"\2" * (server.wal_segment_size or 1 << 20))
        return real(*args, **kwargs)

    monkeypatch.setattr(walingest, "record", archive_meanwhile)
    assert walingest.ingest(server).ingested == [*first, later]


def test_under_a_data_key_the_ingest_compresses_and_encrypts_in_process_for_stock_gpg_and_zstd(
    server, passphrase_file, backup_root, wal_spool, monkeypatch, tmp_path
):
    """No zstd or gpg process per segment (backups.openpgp), yet `gpg -d | zstd -d` gives the file
    back: a full segment, and the small files that share the path (a history file, a .partial)."""
    forget_keys()
    names = spool_segments(server, 1)
    spool = spool_dir(server)
    (spool / "00000002.history").write_text("1\t0/3000000\tbefore 2026-12-03 10:00:00+05\n")
    (spool / "000000010000000000000002.partial").write_bytes(os.urandom(size_of(server) // 3))
    plain = {p.name: p.read_bytes() for p in spool.iterdir() if p.is_file() and not p.name.startswith(".")}
    monkeypatch.setattr(walseal, "WAL_ZSTD", ["/nonexistent/zstd"])  # not needed under a data key
    assert sorted(walingest.ingest(server).ingested) == sorted(
        [*names, "00000002.history", "000000010000000000000002.partial"]
    )
    for name, data in plain.items():
        copy = primary_copy(name)
        walkey = tmp_path / "walkey"
        walkey.write_text(walkeys.unwrap(copy.key_id, Encryption()))
        stock(f"{GPG} -d {path_of(copy)} | zstd -d -q -o {tmp_path / name}", tmp_path, walkey)
        out = (tmp_path / name).read_bytes()
        assert out == data and copy.wal_segment.sha256 == hashlib.sha256(data).hexdigest(), name


def test_with_recipients_an_ingest_without_zstd_says_so_and_keeps_the_spool(
    server, settings, backup_root, wal_spool, monkeypatch, tmp_path
):
    settings.GNUPGHOME, settings.GPG_RECIPIENTS, settings.BACKUP_PASSPHRASE_FILE = (
        recipient_home(tmp_path),
        ["wal@example.mv"],
        "",
    )
    forget_keys()
    names = spool_segments(server, 2)
    monkeypatch.setattr(walseal, "WAL_ZSTD", ["/nonexistent/zstd", "-q", "--fast=1", "-c"])
    with pytest.raises(WalError) as refused:
        walingest.ingest(server)
    assert "zstd is not installed: apt-get install zstd" in str(refused.value)
    assert all((spool_dir(server) / name).exists() for name in names)
    assert not BackupCopy.objects.exists()
    assert not [p for p in (backup_root / "wal").rglob("*") if p.is_file() and "/keys/" not in str(p)]


def test_with_recipients_an_ingest_encrypts_each_segment_to_them_for_stock_gpg_and_zstd(
    server, settings, backup_root, wal_spool, tmp_path
):
    """Public-key mode: a zstd and a gpg process a segment, the plaintext hashed beside them; the
    recipient's secret key and `gpg -d | zstd -d` give each segment back, as the catalog hashed it."""
    home = recipient_home(tmp_path)
    settings.GNUPGHOME, settings.GPG_RECIPIENTS, settings.BACKUP_PASSPHRASE_FILE = home, ["wal@example.mv"], ""
    forget_keys()
    names = spool_segments(server, 3)
    plain = {name: (spool_dir(server) / name).read_bytes() for name in names}
    assert walingest.ingest(server).ingested == names
    for name, data in plain.items():
        copy = primary_copy(name)
        assert copy.key_id == "" and copy.compression == "zstd"
        out = subprocess.run(
            f"gpg --batch --homedir {home} --pinentry-mode loopback --passphrase '' -d {path_of(copy)} | zstd -d -q",
            shell=True,
            capture_output=True,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == data and copy.wal_segment.sha256 == hashlib.sha256(data).hexdigest(), name


def recipient_home(tmp_path):
    """A GNUPGHOME holding a public key (with its secret, which the portal never uses here)."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--batch", "--homedir", str(home), "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run(
        [*gpg, "--quick-gen-key", "wal@example.mv", "ed25519", "cert", "never"], check=True, capture_output=True
    )
    fpr = subprocess.run([*gpg, "--list-keys", "--with-colons"], capture_output=True, text=True).stdout
    fpr = fpr.split("fpr:::::::::")[1].split(":")[0]
    subprocess.run([*gpg, "--quick-add-key", fpr, "cv25519", "encr", "never"], check=True, capture_output=True)
    return str(home)


def test_a_batch_mixes_new_names_with_one_retention_deleted_and_one_already_archived(
    server, passphrase_file, backup_root, wal_spool
):
    """New names are catalogued in bulk; a name whose row retention deleted comes back on that row;
    a name archived already (same content) is a duplicate, taken out of the spool."""
    forget_keys()
    first = spool_segments(server, 1)
    assert walingest.ingest(server).ingested == first
    names = spool_segments(server, 5)  # the first again, byte for byte, and four new ones
    plain = {name: (spool_dir(server) / name).read_bytes() for name in names}
    deleted = WalSegment.objects.create(
        server=server,
        name=names[2],
        timeline=1,
        segno=3,
        size=1,
        sha256="0" * 64,
        key="gone",
        archived_at=timezone.now(),
        deleted_at=timezone.now(),
    )
    result = walingest.ingest(server)
    assert result.duplicates == first and result.ingested == names[1:]
    deleted.refresh_from_db()
    assert deleted.deleted_at is None and deleted.key != "gone"
    for name in names:
        segment = WalSegment.objects.get(server=server, name=name)
        assert segment.sha256 == hashlib.sha256(plain[name]).hexdigest() and segment.size == len(plain[name])
        assert BackupCopy.objects.get(wal_segment=segment).status == "ok"
    assert not [p for p in spool_dir(server).iterdir() if p.is_file() and WAL_FILE.match(p.name)]


def test_new_segments_are_catalogued_in_bulk(server, passphrase_file, backup_root, wal_spool):
    """One by one a segment took 13 statements; in bulk each more costs a couple (its lookup and
    share of a batch), whatever the catalog's database. A batch is what the encryption threads
    have finished: on a loaded machine a segment can be a batch of its own, three statements and
    its lookup (a full suite measured 3.25 a segment), well under 13."""
    forget_keys()
    counts = []
    for first, count in ((1, 2), (3, 10)):
        spool = spool_dir(server)
        spool.mkdir(parents=True, exist_ok=True)
        for n in range(first, first + count):
            (spool / f"0000000100000000000000{n:02X}").write_bytes(bytes([n]) * size_of(server))
        with CaptureQueriesContext(connection) as queries:
            assert len(walingest.ingest(server).ingested) == count
        counts.append(len(queries))
    assert (counts[1] - counts[0]) / 8 <= 5, counts  # at most 5 a segment against 13 one by one


@pytest.mark.parametrize("found", ["before encrypting", "after encrypting"])
def test_a_backlog_is_catalogued_in_batches_up_to_a_bad_segment_and_nothing_after_it_is_left_encrypted(
    found, server, passphrase_file, backup_root, wal_spool, monkeypatch
):
    """A backlog is catalogued INGEST_WORKERS or more segments a
    transaction while the rest encrypt: a bad segment deep in the backlog stops it with everything
    before it catalogued and out of the spool, nothing after it catalogued, encrypted or removed.
    Found before encrypting (its size in the spool), or after (it was cut once the pass had looked
    at it: what was encrypted is short, and the segments encrypted ahead of their turn are removed)."""
    monkeypatch.setattr(walingest, "INGEST_WORKERS", 3)
    server.wal_segment_size = 1 << 20  # known: the first batch is not catalogued one by one to learn it
    server.save(update_fields=["wal_segment_size"])
    names = spool_segments(server, 30)
    spool = spool_dir(server)
    bad = names[23]  # far past the window, after several batches
    if found == "before encrypting":
        (spool / bad).write_bytes(b"cut" * 1000)
    else:
        looked_at = walingest.prepare

        def then_cut(server, path, *args):
            outcome = looked_at(server, path, *args)
            if path.name == bad:
                path.write_bytes(b"cut" * 1000)
            return outcome

        monkeypatch.setattr(walingest, "prepare", then_cut)
    with CaptureQueriesContext(connection) as queries:
        with pytest.raises(WalError, match=f"WAL segment {bad} is 3000 bytes"):
            walingest.ingest(server)
    batches = [q for q in queries if q["sql"].startswith("INSERT") and "walsegment" in q["sql"]]
    catalogued = list(WalSegment.objects.filter(server=server).order_by("name").values_list("name", flat=True))
    assert catalogued == names[:23]
    assert 1 < len(batches) <= 23 // 3 + 1, len(batches)  # in batches, and more than one
    assert sorted(p.name for p in spool.iterdir() if WAL_FILE.match(p.name)) == names[23:]
    stored = {p.name for p in Path(walingest.wal_location().path).rglob("0000*") if p.is_file()}
    assert not [n for n in names[23:] if any(s.startswith(n) for s in stored)]  # nothing encrypted ahead is left
    assert all(any(s.startswith(n) for s in stored) for n in names[:23])


def test_the_workers_ingest_waits_a_while_for_more_wal_and_takes_it_in_the_same_pass(
    server, passphrase_file, backup_root, wal_spool, settings
):
    """Push under load: a segment archived a moment after the spool emptied is ingested by the
    running pass (the worker's schedule, WAL_INGEST_LINGER), not a minute later; then it ends."""
    forget_keys()
    settings.WAL_INGEST_LINGER = 2
    first = spool_segments(server, 1)
    later = "000000010000000000000002"
    spool = spool_dir(server)

    def archive_later():
        while (spool / first[0]).exists():  # the first one ingested: the spool is empty
            time.sleep(0.05)
        time.sleep(0.7)
        tmp = spool / f".{later}.tmp"
        tmp.write_bytes(b"\3" * size_of(server))
        tmp.rename(spool / later)  # as the archive program puts a segment in place

    archiver = threading.Thread(target=archive_later)
    archiver.start()
    started = time.monotonic()
    result = tasks.ingest_wal(server.name)
    archiver.join()
    assert result["ingested"] == 2 and result["last"] == later, result
    assert 2.6 < time.monotonic() - started < walingest.PASS_SECONDS  # it waited 2 s after the last, then ended


def test_a_foreground_ingest_and_an_idle_spool_do_not_wait(server, passphrase_file, backup_root, wal_spool, settings):
    forget_keys()
    settings.WAL_INGEST_LINGER = 30
    spool_segments(server, 1)
    started = time.monotonic()
    assert walingest.ingest(server).as_dict()["ingested"] == 1  # manage.py ingestwal, a backup waiting for its WAL
    assert tasks.ingest_wal(server.name)["ingested"] == 0  # nothing in the spool: the schedule's pass ends at once
    assert time.monotonic() - started < 10


def archive(spool, name, size, fill=b"\3"):
    tmp = spool / f".{name}.tmp"
    tmp.write_bytes(fill * size)
    tmp.rename(spool / name)  # as the archive program puts a segment in place


def ingest_in_thread(server_name, outcome):
    def run():
        try:
            outcome["result"] = tasks.ingest_wal(server_name)
        finally:
            outcome["ended"] = time.monotonic()
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_the_next_scheduled_pass_takes_over_from_the_running_one_with_no_gap(
    server, passphrase_file, backup_root, wal_spool, settings
):
    """Sustained push load: the running pass ends when the next occurrence asks, and the next one
    watches the spool from then on, though its predecessor has just emptied it. Ending at a fixed
    length instead left the spool unread until the next minute's schedule (bench: 43 s)."""
    forget_keys()
    settings.WAL_INGEST_LINGER = 8
    first = spool_segments(server, 1)[0]
    spool = spool_dir(server)
    running, successor = {}, {}
    a = ingest_in_thread(server.name, running)
    wait_for(
        lambda: not (spool / first).exists(), what="the first segment ingested", every=0.02
    )  # A ingested it and lingers
    asked = time.monotonic()
    b = ingest_in_thread(server.name, successor)
    a.join(timeout=10)
    assert not a.is_alive() and running["ended"] - asked < 5, "the running pass did not hand over"
    assert running["result"]["ingested"] == 1 and not running["result"]["busy"]
    wait_for(lambda: spool_locked(spool), what="the successor holding the spool", every=0.02)
    later = "000000010000000000000002"
    archive(spool, later, size_of(server))  # after A ended, and B took a spool A left empty
    b.join(timeout=30)
    assert successor["result"]["ingested"] == 1 and successor["result"]["last"] == later, successor
    assert successor["ended"] - asked > settings.WAL_INGEST_LINGER  # it watched the empty spool it took over


def archiving_every(server, count, every=0.4):
    """`count` segments archived into the server's spool, the first now, then one each `every`
    seconds, on a thread (joined by the caller): (spool, names, thread)."""
    names = [f"0000000100000000000000{n:02X}" for n in range(1, count + 1)]
    spool = spool_dir(server)
    spool.mkdir(parents=True, exist_ok=True)
    archive(spool, names[0], size_of(server))

    def keep_archiving():
        for name in names[1:]:
            time.sleep(every)
            archive(spool, name, size_of(server))

    archiver = threading.Thread(target=keep_archiving)
    archiver.start()
    return spool, names, archiver


@pytest.mark.django_db(transaction=True)
def test_a_scheduled_pass_goes_on_past_pass_seconds_while_wal_keeps_coming(
    server, passphrase_file, backup_root, wal_spool, settings, monkeypatch
):
    forget_keys()
    settings.WAL_INGEST_LINGER = 1
    monkeypatch.setattr(walingest, "PASS_SECONDS", 0.5)
    _, names, archiver = archiving_every(server, 6)
    result = tasks.ingest_wal(server.name)
    archiver.join()
    assert result["ingested"] == len(names), result  # one pass, 2 s of arrivals, though PASS_SECONDS is 0.5


@pytest.mark.django_db(transaction=True)
def test_a_pass_whose_successor_never_comes_ends_at_the_hand_over_bound(
    server, passphrase_file, backup_root, wal_spool, settings, monkeypatch
):
    """Every worker busy: no successor can start. The pass still ends, so that those queued behind
    it do not pile up; what arrives after it waits in the spool for the next."""
    forget_keys()
    settings.WAL_INGEST_LINGER = 5
    monkeypatch.setattr(walingest, "HANDOVER_BOUND", 1.0)
    spool, names, archiver = archiving_every(server, 8)
    started = time.monotonic()
    result = tasks.ingest_wal(server.name)
    ended = time.monotonic() - started
    archiver.join()
    assert 1 <= result["ingested"] < len(names) and ended < 5, (result, ended)  # not 2.8 s of arrivals + 5 s
    assert walingest.pending_names(spool, "push") == names[result["ingested"] :]  # nothing lost


def spool_locked(spool):
    fd = os.open(spool / ".ingest.lock", os.O_RDWR)
    try:
        return not walingest.locked(fd)
    finally:
        os.close(fd)


@pytest.mark.django_db(transaction=True)
def test_a_second_successor_leaves_the_hand_over_to_the_first(
    server, passphrase_file, backup_root, wal_spool, settings
):
    """One waits to take over; another occurrence arriving meanwhile (a worker freed late) ends at once."""
    spool = spool_dir(server)
    spool.mkdir(parents=True, exist_ok=True)
    running = os.open(spool / ".ingest.lock", os.O_RDWR | os.O_CREAT, 0o600)
    assert walingest.locked(running)  # a pass that holds the spool: this test's own descriptor
    waiting = os.open(spool / walingest.HANDOVER, os.O_RDWR | os.O_CREAT, 0o600)
    assert walingest.locked(waiting) and walingest.successor_waits(spool)  # the first successor waits
    settings.WAL_INGEST_LINGER = 5
    started = time.monotonic()
    assert tasks.ingest_wal(server.name)["busy"] is True
    assert time.monotonic() - started < 2
    os.close(waiting)
    assert not walingest.successor_waits(spool)  # gave up: the running pass goes on
    os.close(running)


def test_ingestwal_of_a_server_that_does_not_archive_is_refused(server, wal_spool):
    """Found by a probe: 'ingestwal maldives' of a server without archiving said '0 ingested', exit 0."""
    from tests.helpers import run_command

    assert server.archiving == "none"
    result = run_command("ingestwal", "maldives")
    assert result["_exit"] != 0 and "maldives does not archive WAL: there is no spool to ingest" in result["_stderr"]


def test_a_file_size_limit_met_while_writing_is_named():
    import errno

    from backups.pipeline import _storage_message

    said = _storage_message(OSError(errno.EFBIG, "File too large"))
    assert said.startswith("the backup file grew past the largest file the location takes (File too large)")
