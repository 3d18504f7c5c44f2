"""Exact logical restores, found by review: a partitioned table's row triggers fired on the
parallel restore's own rows (pg_restore -j creates them before the partitions' rows: the parent
has none of its own), and PostgreSQL 17's transaction_timeout on the database or the portal's
role ended a backup's snapshot midway."""

import pytest

from backups.models import Server
from restores.models import RestoreTest
from restores.restoretest import run_restore_test
from tests.helpers import restore_json
from tests.test_exact_restore import backup, protect, register, source  # noqa: F401 - source is a fixture

TRIGGERED = r"""
CREATE TABLE public.parted (id int, region text) PARTITION BY LIST (region);
CREATE TABLE public.parted_mv PARTITION OF public.parted FOR VALUES IN ('mv');
CREATE TABLE public.parted_def PARTITION OF public.parted DEFAULT;
CREATE FUNCTION public.stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.id := NEW.id + 1000; RETURN NEW; END $$;
CREATE TRIGGER parted_stamp BEFORE INSERT ON public.parted FOR EACH ROW EXECUTE FUNCTION public.stamp();
COMMENT ON TRIGGER parted_stamp ON public.parted IS 'adds a thousand';
CREATE TABLE public.audit (what text);
CREATE FUNCTION public.note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO public.audit VALUES (NEW.region); RETURN NULL; END $$;
CREATE TRIGGER parted_note AFTER INSERT ON public.parted FOR EACH ROW EXECUTE FUNCTION public.note();
CREATE FUNCTION public.no_backdating() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF NEW.id < 1000 THEN RAISE EXCEPTION 'back-dated row'; END IF; RETURN NEW; END $$;
CREATE TRIGGER parted_zguard BEFORE INSERT ON public.parted FOR EACH ROW EXECUTE FUNCTION public.no_backdating();
CREATE FUNCTION public.note_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN NULL; END $$;
CREATE EVENT TRIGGER noted ON ddl_command_end EXECUTE FUNCTION public.note_ddl();
INSERT INTO public.parted SELECT g, CASE WHEN g % 2 = 0 THEN 'mv' ELSE 'lk' END FROM generate_series(1, 20000) g;
"""
ROWS = "SELECT count(*), min(id), max(id), (SELECT count(*) FROM public.audit) FROM public.parted"
TRIGGERS = "SELECT tgname, obj_description(oid, 'pg_trigger') FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1"


@pytest.mark.parametrize("jobs", [1, 2], ids=["piped", "parallel"])
def test_a_partitioned_tables_row_triggers_do_not_fire_on_the_restored_rows(
    source,  # noqa: F811 - the fixture
    passphrase_file,
    backup_root,
    settings,
    jobs,
):
    settings.RESTORE_JOBS = jobs
    source.execute("CREATE DATABASE trig")
    source.execute(TRIGGERED, dbname="trig")
    dumped = source.execute(ROWS, dbname="trig")
    assert dumped == [(20000, 1001, 21000, 20000)]
    register(source, "trig", "trig", "source")
    run = backup("trig")
    result = restore_json(str(run.pk), "--into-database", "trig_copy")
    assert result["status"] == "succeeded", result
    assert source.execute(ROWS, dbname="trig_copy") == dumped  # not 2001..22000, nor 40000 audit rows
    assert source.execute(TRIGGERS, dbname="trig_copy") == source.execute(TRIGGERS, dbname="trig")
    assert source.execute("SELECT evtname FROM pg_event_trigger", dbname="trig_copy") == [("noted",)]


@pytest.mark.parametrize("where", ["database", "role"])
def test_transaction_timeout_does_not_stop_a_backup_restore_or_test_on_18(
    pg_cluster_of, db, passphrase_file, backup_root, settings, where
):
    newer = pg_cluster_of(18)
    protect(newer, "source")
    newer.execute("CREATE DATABASE busy")
    newer.execute("CREATE TABLE big AS SELECT g, md5(g::text) h FROM generate_series(1, 300000) g", dbname="busy")
    if where == "database":
        newer.execute("ALTER DATABASE busy SET transaction_timeout = '20ms'")
    else:
        newer.execute("ALTER ROLE portal SET transaction_timeout = '20ms'")
    server = register(newer, "busy", "busy", "source")
    run = backup("busy")
    assert run.status == "succeeded", run.error
    assert run.details["row_counts"] == {"public.big": 300000}
    result = restore_json(str(run.pk), "--into-database", "busy_copy")
    assert result["status"] == "succeeded", result
    test = run_restore_test(server)
    assert test.status == RestoreTest.Status.PASSED, (test.error, test.checks)


def test_a_server_upgraded_in_place_since_registration_gets_the_newer_session_guard(
    pg_cluster_of, db, passphrase_file, backup_root
):
    """Found by review of the fix above: the guard followed the version recorded at registration;
    a server registered on 16 and upgraded since kept it, and its transaction_timeout still ended
    the backup's snapshot. Every connection records the version the server says."""
    newer = pg_cluster_of(18)
    protect(newer, "source")
    newer.execute("CREATE DATABASE busy")
    newer.execute("CREATE TABLE big AS SELECT g, md5(g::text) h FROM generate_series(1, 300000) g", dbname="busy")
    newer.execute("ALTER ROLE portal SET transaction_timeout = '20ms'")
    server = register(newer, "busy", "busy", "source")
    Server.objects.filter(pk=server.pk).update(pg_version=160004)  # registered before its upgrade
    run = backup("busy")
    assert run.status == "succeeded", run.error
    assert Server.objects.get(pk=server.pk).pg_version // 10000 == 18


def test_a_dsn_that_once_reached_a_newer_cluster_still_connects_to_its_older_one(pg_cluster_of, db):
    """Found by review of the fix above: the guard chosen from the recorded version named
    transaction_timeout at startup to a 15 once an 18 had answered at the DSN: FATAL, for good."""
    older, newer = pg_cluster_of(15), pg_cluster_of(18)
    protect(older, "source")
    protect(newer, "source")
    server = register(older, "x", "postgres", "source")
    Server.objects.filter(pk=server.pk).update(dsn=newer.dsn("postgres"))  # a failover, a VIP, a typo
    Server.objects.get(pk=server.pk).connect().close()
    assert Server.objects.get(pk=server.pk).pg_version // 10000 == 18
    Server.objects.filter(pk=server.pk).update(dsn=older.dsn("postgres"))  # back at its own cluster
    with Server.objects.get(pk=server.pk).connect() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
    assert Server.objects.get(pk=server.pk).pg_version // 10000 == 15  # and its tools' guard follows


def test_a_copy_of_a_base_backup_from_before_an_upgrade_is_reached_with_its_own_versions_guard(pg_cluster_of, db):
    from restores.restoretest import throwaway_server

    copy_of_15 = pg_cluster_of(15)
    protect(copy_of_15, "source")
    production = register(copy_of_15, "x", "postgres", "source")
    Server.objects.filter(pk=production.pk).update(pg_version=180000)  # production upgraded since
    production.refresh_from_db()
    throwaway_server(production, copy_of_15.port).connect().close()
