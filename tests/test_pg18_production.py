"""PostgreSQL 18 in production: a logical backup of an 18 database that uses what only 18 has
(virtual generated columns, named and NOT VALID NOT NULL constraints, temporal keys, constraints
NOT ENFORCED, uuidv7() defaults) restores exactly, by pg_restore alone and streamed, and its
restore test passes; and a base backup of a cluster with data checksums (18's default) refuses a
corrupt page by name."""

import json
import subprocess
from io import StringIO

import pytest
from django.core.management import call_command

from backups.models import BackupRun, Database
from tests import awkward_schema
from tests.helpers import enable_push, restore_json, run_command
from tests.helpers import register as register_server
from tests.test_exact_restore import backup, protect, register  # noqa: F401
from tests.test_restore_streamed import loaders  # noqa: F401

pytest_plugins = ["tests.walfixtures"]

EIGHTEEN = r"""
CREATE EXTENSION btree_gist;
CREATE TABLE public.prices (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  item uuid DEFAULT uuidv7() NOT NULL,
  net numeric NOT NULL,
  qty int,
  gross numeric GENERATED ALWAYS AS (net * 1.2),
  gross_stored numeric GENERATED ALWAYS AS (net * 1.2) STORED,
  label text GENERATED ALWAYS AS ('#' || id::text || ' ' || qty::text) VIRTUAL,
  note text CONSTRAINT note_present NOT NULL,
  CONSTRAINT net_positive CHECK (net > 0) NOT ENFORCED
);
INSERT INTO public.prices (net, qty, note) SELECT g, CASE WHEN g % 3 = 0 THEN NULL ELSE g END, 'n' || g
  FROM generate_series(-5, 3000) g;
ALTER TABLE public.prices ADD CONSTRAINT qty_present NOT NULL qty NOT VALID;
CREATE TABLE public.parent (a int CONSTRAINT parent_a_nn NOT NULL, b int);
CREATE TABLE public.kid (c int) INHERITS (public.parent);
ALTER TABLE public.kid ADD CONSTRAINT kid_b_nn NOT NULL b;
INSERT INTO public.kid VALUES (1, 2, 3);
CREATE TABLE public.rooms (id int, valid_at daterange, name text,
  CONSTRAINT rooms_pk PRIMARY KEY (id, valid_at WITHOUT OVERLAPS));
INSERT INTO public.rooms VALUES (1, '[2026-01-01,2026-06-01)', 'a'), (1, '[2026-06-01,2027-01-01)', 'b');
CREATE TABLE public.bookings (id int, room int, valid_at daterange,
  CONSTRAINT bookings_room FOREIGN KEY (room, PERIOD valid_at) REFERENCES public.rooms (id, PERIOD valid_at));
INSERT INTO public.bookings VALUES (1, 1, '[2026-02-01,2026-08-01)');
CREATE TABLE public.loose (id int, price bigint,
  CONSTRAINT loose_price FOREIGN KEY (price) REFERENCES public.prices (id) NOT ENFORCED);
INSERT INTO public.loose VALUES (1, 999999);
CREATE TABLE public.only_virtual (k int, v int GENERATED ALWAYS AS (k + 1));
INSERT INTO public.only_virtual SELECT g FROM generate_series(1, 10) g;
"""


@pytest.mark.parametrize("jobs", [1, 2])  # pg_restore alone, and the rows streamed while gpg decrypts
@pytest.mark.parametrize("pg_major", [18])
def test_an_18_database_restores_exactly_and_its_restore_test_passes(
    loaders,  # noqa: F811 - the fixture imported above
    pg_cluster,
    passphrase_file,
    backup_root,
    settings,
    jobs,
):
    settings.RESTORE_JOBS = jobs
    protect(pg_cluster, "source")
    pg_cluster.execute(
        "CREATE DATABASE prod LOCALE_PROVIDER builtin BUILTIN_LOCALE 'PG_UNICODE_FAST' TEMPLATE template0"
    )
    pg_cluster.execute(EIGHTEEN, dbname="prod")
    pg_cluster.execute("ANALYZE", dbname="prod")
    server = register(pg_cluster, "prod", "prod", "source")
    run = backup("prod")

    result = restore_json(str(run.pk), "--into-database", "prod_copy")

    assert result["status"] == "succeeded", result
    assert [len(loader.rows) for loader in loaders] == ([7] if jobs > 1 else [])  # every table's rows streamed
    before = awkward_schema.fingerprint(pg_cluster, "prod")
    after = awkward_schema.fingerprint(pg_cluster, "prod_copy")
    assert after["schema"] == before["schema"]  # pg_dump --schema-only, line for line
    assert after == before  # rows (virtual columns computed), database properties, extensions
    props = "SELECT datlocprovider, datlocale, datcollate, datctype FROM pg_database WHERE datname = %s"
    assert pg_cluster.execute(props, ["prod_copy"]) == pg_cluster.execute(props, ["prod"])
    # The planner's statistics came back (pg_dump 18 --statistics), without an ANALYZE.
    stats = "SELECT attname, null_frac, n_distinct FROM pg_stats WHERE tablename = 'prices' ORDER BY 1"
    assert pg_cluster.execute(stats, dbname="prod_copy") == pg_cluster.execute(stats, dbname="prod") != []

    # A restore test digests the critical tables' rows, virtual generated columns included.
    database = Database.objects.get(server=server, name="prod")
    database.critical_tables = ["public.prices", "public.only_virtual", "public.kid"]
    database.save()
    backup("prod")
    out = StringIO()
    call_command("restoretest", "prod", "--json", stdout=out)
    result = json.loads(out.getvalue().splitlines()[-1])
    assert result["status"] == "passed", result["checks"]
    assert {c["name"] for c in result["checks"]} >= {"content of public.prices", "content of public.only_virtual"}


@pytest.mark.parametrize("jobs", [1, 2])
def test_an_18_servers_awkward_database_restores_into_another_18_server_exactly(
    pg_cluster_of, pg18_bin, db, passphrase_file, backup_root, settings, jobs
):
    """The roles and database of every awkward feature (tests/awkward_schema.py) and 18's own, from
    one 18 server to another: 18's pg_dump and pg_dumpall on both sides."""
    settings.RESTORE_JOBS = jobs
    old, new = pg_cluster_of(18), pg_cluster_of(18)
    awkward_schema.make_roles(old)
    dbname = awkward_schema.make_awkward(old)
    old.execute(EIGHTEEN, dbname=dbname)
    register_server(old, "maldives", dbname)
    register_server(new, "other", "postgres")
    call_command("backup", "maldives", stdout=StringIO())
    run = BackupRun.objects.get(server__name="maldives", status="succeeded", kind="logical")
    result = restore_json(str(run.pk), "--into-database", "copy18", "--into-server", "other", "--with-role-passwords")
    assert result["status"].startswith("succeeded"), result
    before = awkward_schema.fingerprint(old, dbname)
    after = awkward_schema.fingerprint(new, "copy18")
    assert after["tables"] == before["tables"]
    assert after["schema"] == before["schema"]
    assert after == before


@pytest.mark.parametrize("pg_major", [15, 18])
def test_a_base_backup_of_a_cluster_with_a_corrupt_page_fails_naming_the_file(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, pg_major
):
    """18's initdb enables data checksums, and a base backup checks every page it sends. One that
    fails its checksum fails the backup, naming the file and block (pg_basebackup said only
    "checksum error occurred"), on pg_basebackup's path (18 of the wheel) and the server's (15,
    checksums enabled by pg_checksums)."""
    enable_push(sample_cluster)
    path = sample_cluster.execute("SELECT pg_relation_filepath('audit_logs')", dbname="reliabilitymaldives")[0][0]
    sample_cluster.execute("CHECKPOINT")
    sample_cluster.stop()
    if pg_major == 15:
        checksums = ["runuser", "-u", "postgres", "--", str(sample_cluster.bin_dir / "pg_checksums")]
        subprocess.run([*checksums, "--enable", "-D", str(sample_cluster.datadir)], capture_output=True, check=True)
    with open(sample_cluster.datadir / path, "r+b") as f:  # block 1's tuples, its header left alone
        f.seek(8192 + 4000)
        f.write(b"corrupt" * 10)
    sample_cluster.start()
    assert sample_cluster.execute("SHOW data_checksums") == [("on",)]

    base = run_command("backup", "maldives", "--kind", "base")

    assert base["status"] == "failed", base
    error = base["error"]
    assert f'checksum verification failed in file "./{path}", block 1' in error, error
    assert f"pg_filenode_relation(0, {path.rsplit('/', 1)[1]})" in error, error
    assert "\n" not in error
