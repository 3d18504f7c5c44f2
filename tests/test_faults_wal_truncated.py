"""A truncated WAL segment, on a real cluster archiving by push: the archive program refuses it
(PostgreSQL keeps the whole one and retries), the ingest never catalogues one, and a stored copy
truncated later is found corrupt by verify."""

import json
import os
import shutil
from pathlib import Path

from django.core.management import call_command

from backupportal.lib.osuser import free_port
from backups import archive_wal, walchain, walingest, walnames, walspool
from backups.models import BackupCopy, WalSegment
from tests.helpers import archive_as_postgres, enable_push, pitr, rows, run_command, switch_wal, wait_archived
from watching.models import Alert
from watching.monitor import check_wal

pytest_plugins = ["tests.walfixtures"]
DB = "reliabilitymaldives"


def archive_segments(cluster, count):
    names = []
    for _ in range(count):
        cluster.execute("CREATE TABLE IF NOT EXISTS tr(x int); INSERT INTO tr VALUES (1)", dbname=DB)
        names.append(switch_wal(cluster))
    wait_archived(cluster, names[-1])
    return names


def spooled(spool):
    return sorted(n for n in os.listdir(spool) if walnames.SEGMENT.match(n) or n.endswith(".tmp"))


def test_the_archive_program_refuses_a_truncated_segment_and_takes_the_whole_one_on_the_retry(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, segment_file
):
    enable_push(sample_cluster)
    first, name = archive_segments(sample_cluster, 2)
    spool = walspool.spool_dir(server)
    whole = (spool / name).read_bytes()
    (spool / name).unlink()  # as if PostgreSQL had not archived it yet: it still has it in pg_wal

    # The portal has not learned the size yet: only a size no segment can have is refused.
    odd = archive_as_postgres(server, segment_file(whole[:-8192]), name)
    assert odd.returncode == 1 and f"refusing {name}: it is {len(whole) - 8192} bytes, which no WAL" in odd.stderr

    assert walingest.ingest(server).ingested == [first]  # learns the size and leaves it for the program
    assert (spool / archive_wal.SIZE_FILE).read_text() == f"{len(whole)}\n"
    half = archive_as_postgres(server, segment_file(whole[: len(whole) // 2]), name)
    [line] = half.stderr.strip().splitlines()
    assert half.returncode == 1, half.stderr
    assert f"refusing {name}: it is {len(whole) // 2} bytes, not the server's segment size of {len(whole)}" in line
    marker = json.loads((spool / "errors" / f"{name}.json").read_text())
    assert marker["reason"] == "wrong_size" and marker["message"] == line
    assert spooled(spool) == []  # nothing under that name, no temporary file left
    assert name in check_wal(server)["archive_failing"]  # the monitor's minute

    ok = archive_as_postgres(server, segment_file(whole), name)
    assert ok.returncode == 0, ok.stderr
    assert (spool / name).read_bytes() == whole and not (spool / "errors" / f"{name}.json").exists()
    assert walingest.ingest(server).ingested == [name]
    assert WalSegment.objects.get(name=name).size == len(whole)


def test_the_ingest_refuses_a_truncated_segment_in_the_spool_until_the_whole_one_is_back(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, tmp_path
):
    enable_push(sample_cluster)
    [first] = archive_segments(sample_cluster, 1)
    assert walingest.ingest(server).ingested == [first]
    server.refresh_from_db()
    size = server.wal_segment_size
    *before, victim, after = archive_segments(sample_cluster, 4)
    spool = walspool.spool_dir(server)
    kept = tmp_path / victim
    shutil.copy2(spool / victim, kept)
    os.truncate(spool / victim, 5 * 1024 * 1024 + 123)  # damaged in the spool, after the program took it

    refused = run_command("ingestwal", "maldives")
    assert refused["_exit"] == 1, refused
    [line] = refused["_stderr"].strip().splitlines()
    assert f"WAL segment {victim} is {5 * 1024 * 1024 + 123} bytes, not the {size} bytes of maldives's segments" in line
    assert "truncated" in line and f"replace {spool / victim} with the whole segment from pg_wal" in line
    assert not WalSegment.objects.filter(name__in=[victim, after]).exists()
    assert WalSegment.objects.filter(name__in=before).count() == 2  # those before it (encrypted together)
    assert spooled(spool) == [victim, after]  # nothing taken out of the spool
    for name in (victim, after):  # nor half-written, nor encrypted ahead and left uncatalogued
        assert not list(Path(walingest.wal_location().path).rglob(f"{name}*"))
    assert json.loads((spool / "errors" / "ingest.json").read_text())["reason"] == "ingest_failed"
    call_command("monitor", "--once")
    alert = Alert.objects.get(condition="archive_failing", server=server)
    assert alert.state == "open" and f"WAL segment {victim} is " in alert.message

    shutil.copy2(kept, spool / victim)  # the whole segment, from pg_wal
    assert walingest.ingest(server).ingested == [victim, after]
    first_no, last_no = (walnames.segno_of(n, size) for n in (first, after))
    assert walchain.missing_segments(server, first_no, last_no) == []
    assert WalSegment.objects.get(name=victim).size == size
    assert not (spool / "errors" / "ingest.json").exists()
    call_command("monitor", "--once")
    assert Alert.objects.get(condition="archive_failing", server=server).state == "resolved"


def test_verify_finds_a_stored_segment_truncated_after_archiving(
    server, sample_cluster, passphrase_file, backup_root, wal_spool
):
    enable_push(sample_cluster)
    [name] = archive_segments(sample_cluster, 1)
    walingest.ingest(server)
    copy = BackupCopy.objects.get(wal_segment__name=name, location__name="wal")
    path = Path(copy.location.path) / copy.key
    os.truncate(path, path.stat().st_size // 2)

    found = run_command("verify")
    assert found["_exit"] == 1 and found["bad"] == 1, found
    [listed] = found["copies"]
    assert listed["wal_segment"] == name and "sha256" in listed["error"], listed
    copy.refresh_from_db()
    assert copy.status == "bad"
    assert Alert.objects.get(condition="corruption", server=server).state == "open"


def test_latest_fails_naming_a_segment_damaged_before_its_end_and_a_target_before_it_restores(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored
):
    """A segment damaged in the spool before ingest is catalogued with the damaged file's checksum;
    recovery stops at the damage and promotes: --target latest read that as the end of the WAL and
    succeeded without the 2000 rows after it."""
    enable_push(sample_cluster)
    assert run_command("backup", "maldives", "--kind", "base")["status"] == "succeeded"
    sample_cluster.execute("CREATE TABLE p(tx text); INSERT INTO p VALUES ('X1')", dbname=DB)
    kept = sample_cluster.execute("SELECT pg_current_wal_lsn()::text")[0][0]
    sample_cluster.execute("INSERT INTO p SELECT 'X2-' || g FROM generate_series(1, 2000) g", dbname=DB)
    name = switch_wal(sample_cluster)
    wait_archived(sample_cluster, name)
    server.refresh_from_db()
    path = walspool.spool_dir(server) / name
    data = bytearray(path.read_bytes())
    data[walnames.lsn_to_int(kept) % server.wal_segment_size + 200] ^= 0xFF
    path.write_bytes(bytes(data))
    assert name in walingest.ingest(server).ingested

    datadir = restored()
    result = pitr(datadir, free_port(), "--target", "latest")
    assert result["status"] == "failed" and result["_exit"] == 1, result
    assert f"WAL segment {name} is damaged from LSN " in result["error"], result
    assert "short of the end of the archived WAL" in result["error"]

    port = free_port()
    result = pitr(restored(), port, "--target-lsn", kept)
    assert result["status"] == "succeeded", result
    assert rows(port, "SELECT tx FROM p") == [("X1",)]
