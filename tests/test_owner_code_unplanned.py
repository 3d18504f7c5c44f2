"""A table owner's code in an expression index, a partial index's WHERE, expression statistics or
a partition key: PostgreSQL folds it whenever it plans a query on the table, as the role that
plans. The backup's counts and digests (and the restore test's) used to plan a count(*) or a
SELECT over every table, as the server's registered role, a superuser here: found by review,
an owner's IMMUTABLE function ran as that superuser on production before every backup. Such
tables are now read by COPY, which plans nothing (backups.unplanned)."""

import psycopg
import pytest

from backups import tables
from backups.models import BackupRun, Database, Server
from backups.pipeline import _in_snapshot
from restores.restoretest import run_restore_test
from tests.helpers import run_command

pytestmark = pytest.mark.django_db
DB = "reliabilitymaldives"

# evil() fails whenever it runs as anyone but its owner: a backup that ran it as the portal's
# superuser fails with "evil ran as postgres".
OWNER = r"""
CREATE ROLE owner LOGIN;
GRANT CREATE ON SCHEMA public TO owner;
SET ROLE owner;
CREATE FUNCTION public.evil(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF current_user <> 'owner' THEN RAISE EXCEPTION 'evil ran as %', current_user; END IF;
  RETURN $1;
END $$;
CREATE TABLE public.readings (a int, note text);
INSERT INTO public.readings SELECT g, 'reading ' || g FROM generate_series(1, 10) g;
CREATE INDEX ON public.readings ((a + public.evil(0)));
CREATE TABLE public.sensors (a int);
INSERT INTO public.sensors SELECT generate_series(1, 11);
CREATE INDEX ON public.sensors (a) WHERE a > public.evil(0);
CREATE TABLE public.samples (a int);
INSERT INTO public.samples SELECT generate_series(1, 12);
CREATE STATISTICS samples_evil ON (a + public.evil(0)) FROM public.samples;
ANALYZE public.samples;
RESET ROLE;
"""

PARTITIONED = r"""
SET ROLE owner;
CREATE TABLE public.meters (a int, b bool) PARTITION BY RANGE ((a + public.evil(0)));
CREATE TABLE public.meters_low PARTITION OF public.meters FOR VALUES FROM (0) TO (100);
RESET ROLE;
INSERT INTO public.meters SELECT g, true FROM generate_series(1, 13) g;
"""


def critical(server, *names):
    Database.of_dsn(server)
    Database.objects.filter(server=server, name=DB).update(critical_tables=list(names))


def test_a_backup_and_its_restore_test_never_run_an_owners_index_code_as_the_portals_role(
    server, sample_cluster, passphrase_file, backup_root
):
    sample_cluster.execute(OWNER, dbname=DB)
    critical(server, "public.readings", "public.users")
    result = run_command("backup", "maldives")
    assert result["status"] == "succeeded", result
    run = BackupRun.objects.get(kind="logical", status="succeeded")
    counts = run.details["row_counts"]
    assert (counts["public.readings"], counts["public.sensors"], counts["public.samples"]) == (10, 11, 12)
    assert counts["public.users"] == 200  # the others, the batched count(*)
    digests = run.details["content_digests"]
    assert digests["public.readings"].startswith("v2:10:")
    assert digests["public.users"].startswith("200:")  # no owner code: the planned digest, as before
    test = run_restore_test(Server.objects.get(), actor="test")
    checks = {c["name"]: c for c in test.checks}
    assert test.status == "passed", test.checks
    assert checks["content of public.readings"]["ok"] and checks["rows in public.readings"]["ok"]
    assert checks["row counts of every table"]["ok"]


def test_a_partition_key_over_an_owners_function_is_digested_without_running_it(
    server, sample_cluster, passphrase_file, backup_root
):
    sample_cluster.execute(OWNER + PARTITIONED, dbname=DB)
    critical(server, "public.meters")
    result = run_command("backup", "maldives")
    assert result["status"] == "succeeded", result
    run = BackupRun.objects.get(kind="logical", status="succeeded")
    assert run.details["row_counts"]["public.meters_low"] == 13
    assert run.details["content_digests"]["public.meters"].startswith("v2:13:")


def test_an_index_created_after_the_snapshot_is_seen_before_the_count_plans(sample_cluster):
    """CREATE INDEX takes a SHARE lock, which the backup's ACCESS SHARE lets through, and the
    planner reads the latest catalog where the snapshot's queries see the old one."""
    sample_cluster.execute(OWNER, dbname=DB)
    sample_cluster.execute(
        "CREATE TABLE public.late (a int); INSERT INTO public.late SELECT generate_series(1, 7)", dbname=DB
    )
    sample_cluster.execute("ALTER TABLE public.late OWNER TO owner", dbname=DB)
    with (
        sample_cluster.connect(DB) as exporter,
        sample_cluster.connect(DB) as counter,
        sample_cluster.connect(DB) as catalog,
    ):
        exporter.autocommit, counter.autocommit, catalog.autocommit = False, True, True
        exporter.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = exporter.execute("SELECT pg_export_snapshot()").fetchone()[0]
        listed = tables.user_tables(exporter)
        tables.lock_all(exporter, listed)
        sample_cluster.execute("SET ROLE owner; CREATE INDEX ON public.late ((a + public.evil(0)))", dbname=DB)
        counts = tables.count_all(
            counter, transaction=lambda: _in_snapshot(counter, snapshot), listed=listed, catalog=catalog
        )
        assert counts["public.late"] == 7


def test_a_role_that_may_not_write_server_files_counts_by_copy_to_the_client(sample_cluster):
    sample_cluster.execute(OWNER, dbname=DB)
    sample_cluster.execute("CREATE ROLE reader LOGIN PASSWORD 'reader' IN ROLE pg_read_all_data")
    dsn = sample_cluster.dsn(DB, user="reader")
    with psycopg.connect(dsn, password="reader", autocommit=True) as conn:
        conn.execute("SET search_path = pg_catalog")
        errors = {}
        counts = tables.count_all(conn, errors)
        assert errors == {}
        assert (counts["public.readings"], counts["public.sensors"], counts["public.samples"]) == (10, 11, 12)
        assert tables.content_digest(conn, "public.readings").startswith("v2:10:")
