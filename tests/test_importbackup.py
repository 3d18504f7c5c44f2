"""Backups made elsewhere: a stock pg_dump -Fc file (plain, or encrypted by plain gpg) registered
as a run of a server, never stored in plaintext, copied to every tier, and restored through a
request and a second DBA's approval with identical rows; wrong input refused in one line."""

import subprocess
from pathlib import Path

import pytest
from django.urls import reverse

from backupportal.models import JournalEntry
from backups.models import BackupRun
from restores.models import RestoreRequest, RestoreRun
from tests.helpers import run_command
from tests.stock import GPG, stock

TABLES = ("users", "roles", "audit_logs", "financial_records")


def stock_dump(cluster, into, dbname="reliabilitymaldives"):
    """`pg_dump -Fc`, as a DBA runs it on another host: no portal code."""
    env = {"PGHOST": cluster.host, "PGPORT": str(cluster.port), "PGUSER": "postgres", "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [str(Path(cluster.bin_dir) / "pg_dump"), "-Fc", "-f", str(into), dbname], env=env, check=True, timeout=300
    )
    return into


def table_digests(cluster, dbname):
    """Every row of every sample table, as one md5 per table: identical rows give identical digests."""
    with cluster.connect(dbname) as conn:
        return {
            t: conn.execute(
                f"SELECT count(*), md5(string_agg(x::text, '|' ORDER BY x::text)) FROM \"{t}\" x"
            ).fetchone()
            for t in TABLES
        }


def files_in(*roots):
    return sorted(str(p) for root in roots for p in Path(root).rglob("*") if p.is_file())


def restore_by_request(client, alice, bob, run, database):
    client.force_login(alice)
    client.post(
        reverse("restore-request-new"),
        {
            "server": run.server_id,
            "backup_run": run.pk,
            "destination": "new_database",
            "target_database": database,
            "reason": "check the dump the old cron job made",
        },
    )
    request = RestoreRequest.objects.get(backup_run=run)
    client.force_login(bob)
    client.post(reverse("restore-request-approve", args=[request.pk]), {"note": "ok"})
    request.refresh_from_db()
    return request


def test_a_plain_stock_dump_is_encrypted_on_its_way_in_and_restores_through_approval(
    client, alice, bob, tiers, passphrase_file, server, sample_cluster, tmp_path
):
    dump = stock_dump(sample_cluster, tmp_path / "nightly.dump")
    result = run_command("importbackup", str(dump), "--server", "maldives")
    assert result["_exit"] == 0, result["_stderr"]
    assert result["database"] == "reliabilitymaldives" and result["status"] == "succeeded"
    assert {c["location"]: c["status"] for c in result["copies"]} == {"primary": "ok", "nas": "ok", "s3": "ok"}
    run = BackupRun.objects.get(pk=result["id"])
    # Never a plaintext copy on a tier: every stored byte is gpg's, and it opens to the very dump.
    primary = Path(tiers.primary) / run.key
    assert not primary.read_bytes().startswith(b"PGDMP")
    s3_object = tiers.s3.get_object(Bucket=tiers.bucket, Key=f"backupportal/{run.key}")["Body"].read()
    assert s3_object == primary.read_bytes() and b"PGDMP" not in s3_object[:64]
    stock(f"{GPG} --decrypt {primary} | cmp - {dump}", tmp_path, passphrase_file)
    entry = JournalEntry.objects.get(action="backup_imported")
    assert entry.details["file"] == "nightly.dump" and entry.actor.startswith("os:")

    request = restore_by_request(client, alice, bob, run, "imported_plain")
    assert request.status == "succeeded", RestoreRun.objects.get(request=request).error
    assert table_digests(sample_cluster, "imported_plain") == table_digests(sample_cluster, "reliabilitymaldives")


def test_a_dump_encrypted_by_plain_gpg_restores_through_approval(
    client, alice, bob, tiers, passphrase_file, server, sample_cluster, tmp_path
):
    dump = stock_dump(sample_cluster, tmp_path / "nightly.dump")
    stock(f"{GPG} --symmetric --cipher-algo AES256 -o {dump}.gpg {dump}", tmp_path, passphrase_file)
    result = run_command("importbackup", f"{dump}.gpg", "--server", "maldives", "--database", "reliabilitymaldives")
    assert result["_exit"] == 0, result["_stderr"]
    run = BackupRun.objects.get(pk=result["id"])
    assert run.details["imported"]["came_encrypted"] is True
    assert (Path(tiers.primary) / run.key).read_bytes() == Path(f"{dump}.gpg").read_bytes()

    request = restore_by_request(client, alice, bob, run, "imported_gpg")
    assert request.status == "succeeded", RestoreRun.objects.get(request=request).error
    assert table_digests(sample_cluster, "imported_gpg") == table_digests(sample_cluster, "reliabilitymaldives")


def test_an_imported_dump_passes_a_restore_test(tiers, passphrase_file, server, sample_cluster, tmp_path):
    dump = stock_dump(sample_cluster, tmp_path / "nightly.dump")
    assert run_command("importbackup", str(dump), "--server", "maldives")["_exit"] == 0
    result = run_command("restoretest", "maldives", "--kind", "logical")
    assert result["_exit"] == 0 and result["status"] == "passed", result


@pytest.mark.parametrize(
    "what, said",
    [
        ("not a dump", "neither a pg_dump custom-format archive nor a gpg file"),
        ("wrong passphrase", "wrong passphrase or key"),
        ("gpg of a text file", "is not a pg_dump custom-format archive"),
        ("unknown server", "unknown server 'nowhere'"),
        ("missing file", "is not a file"),
        # Cut short where its data ends (a job that died mid-write): its table of contents is whole.
        ("truncated dump", "is not a whole pg_dump archive: pg_restore could not read it to its end"),
        ("truncated dump, encrypted", "is not a whole pg_dump archive: pg_restore could not read it to its end"),
        ("database name too long", "cannot be a PostgreSQL database name (at most 63 bytes, no control characters)"),
    ],
)
def test_wrong_input_is_refused_in_one_line_and_nothing_is_stored(
    what, said, tiers, passphrase_file, server, sample_cluster, tmp_path
):
    bad = tmp_path / "input"
    server_name, more = "maldives", []
    if what == "not a dump":
        bad.write_text("-- a plain SQL script\nSELECT 1;\n")
    elif what == "wrong passphrase":
        dump = stock_dump(sample_cluster, tmp_path / "nightly.dump")
        other = tmp_path / "other-passphrase"
        other.write_text("not the portal's passphrase\n")
        stock(
            f"gpg --batch --quiet --pinentry-mode loopback --passphrase-file {other} --symmetric -o {bad} {dump}",
            tmp_path,
            other,
        )
    elif what == "gpg of a text file":
        text = tmp_path / "notes.txt"
        text.write_text("not a dump at all\n")
        stock(f"{GPG} --symmetric -o {bad} {text}", tmp_path, passphrase_file)
    elif what.startswith("truncated dump"):
        dump = stock_dump(sample_cluster, tmp_path / "nightly.dump")
        cut = tmp_path / "cut.dump"
        cut.write_bytes(dump.read_bytes()[:-2000])
        if what.endswith("encrypted"):
            stock(f"{GPG} --symmetric -o {bad} {cut}", tmp_path, passphrase_file)
        else:
            cut.rename(bad)
    elif what == "unknown server":
        stock_dump(sample_cluster, bad)
        server_name = "nowhere"
    elif what == "database name too long":
        stock_dump(sample_cluster, bad)
        more = ["--database", "é" + "x" * 62]  # 64 bytes: PostgreSQL would cut it to another name
    before = files_in(tiers.primary, tiers.nas)
    result = run_command("importbackup", str(bad), "--server", server_name, *more)
    assert result["_exit"] == 1 and said in result["_stderr"]
    assert "\n" not in result["_stderr"].strip()
    assert not BackupRun.objects.exists() and files_in(tiers.primary, tiers.nas) == before
    assert "Contents" not in tiers.s3.list_objects_v2(Bucket=tiers.bucket)
    assert not JournalEntry.objects.filter(action="backup_imported").exists()


def test_an_imported_dump_restores_onto_another_server_with_a_warning_for_its_missing_globals(
    tiers, passphrase_file, server, sample_cluster, pg_cluster_of, tmp_path
):
    from tests.helpers import register, restore_json

    other = pg_cluster_of(15)
    register(other, "island", "postgres")
    dump = stock_dump(sample_cluster, tmp_path / "nightly.dump")
    run_id = run_command("importbackup", str(dump), "--server", "maldives")["id"]
    result = restore_json(str(run_id), "--into-database", "from_elsewhere", "--into-server", "island")
    assert result["status"] == "succeeded with warnings", result
    assert any("imported without its globals" in w for w in result["warnings"])
    assert table_digests(other, "from_elsewhere") == table_digests(sample_cluster, "reliabilitymaldives")


@pytest.mark.django_db(transaction=True)
def test_a_file_that_is_no_dump_gets_one_line_on_stderr_from_manage_py(passphrase_file, server, settings, tmp_path):
    """python-gnupg warns of the failed probe on its logger: the command's own line is the only one."""
    from tests.helpers import manage

    bad = tmp_path / "plain.sql"
    bad.write_text("-- a plain SQL script\nSELECT 1;\n")
    out, err = manage(settings, "importbackup", str(bad), "--server", "maldives").communicate(timeout=120)
    assert err.strip().splitlines() == [
        "CommandError: plain.sql: it is neither a pg_dump custom-format archive nor a gpg file: nothing was imported"
    ]
