"""Logical restores and restore tests against real clusters."""

import json
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from backupportal.lib import sampledata
from backups.models import BackupCopy, BackupRun, Database
from restores import logical
from restores.models import RestoreTest, ValidationCheck
from tests.helpers import register, restore_json
from watching.models import Alert


def take_backup():
    call_command("backup", "maldives", stdout=StringIO())
    return BackupRun.objects.filter(status="succeeded").latest("created_at")


def databases(cluster):
    return {r[0] for r in cluster.execute("SELECT datname FROM pg_database")}


@pytest.mark.parametrize("pg_major", [15, 18])  # on 18 too: tests/test_pg18.py
def test_restore_into_a_new_database_has_every_row(server, sample_cluster, passphrase_file, backup_root, settings):
    settings.RESTORE_JOBS = 1  # piped: no plaintext on disk at all
    run = take_backup()
    result = restore_json(str(run.pk), "--into-database", "restored_copy")
    assert result["status"] == "succeeded", result
    assert "sha256 verified" in result["notes"]
    with sample_cluster.connect("reliabilitymaldives") as a, sample_cluster.connect("restored_copy") as b:
        assert sampledata.counts(a) == sampledata.counts(b)
    scratch = Path(settings.VAR_DIR) / "scratch"
    assert not scratch.exists() or not list(scratch.iterdir())


@pytest.mark.parametrize("pg_major", [18])  # pg_dump 18 dumps the planner's statistics when asked
@pytest.mark.parametrize("jobs", [1, 2])
def test_a_restored_copy_has_productions_planner_statistics(
    server, sample_cluster, passphrase_file, backup_root, settings, jobs
):
    """Without them the copy plans blind until an ANALYZE (autovacuum's, hours on a large database)."""
    settings.RESTORE_JOBS = jobs
    sample_cluster.execute("ANALYZE", dbname="reliabilitymaldives")
    run = take_backup()
    assert restore_json(str(run.pk), "--into-database", "restored_stats")["status"] == "succeeded"
    statistics = (
        "SELECT c.relname, c.reltuples, count(s.attname), round(sum(s.n_distinct)::numeric, 2) FROM pg_class c"
        " LEFT JOIN pg_stats s ON s.schemaname = 'public' AND s.tablename = c.relname"
        " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' GROUP BY 1, 2 ORDER BY 1"
    )
    with sample_cluster.connect("reliabilitymaldives") as a, sample_cluster.connect("restored_stats") as b:
        source = a.execute(statistics).fetchall()
        assert source and all(columns for _, _, columns, _ in source)
        assert b.execute(statistics).fetchall() == source


def test_planner_statistics_stay_out_of_a_server_older_than_18_only():
    """No PostgreSQL 17 here to restore into: the choice itself. 18's pg_restore_relation_stats is
    what the statistics are restored with; 17 has none, and the restore failed on it."""
    run = SimpleNamespace(details={"pg_dump_major": 18})
    assert logical.statistics_left_out(SimpleNamespace(pg_version=170006), run) == ["--no-statistics"]
    assert logical.statistics_left_out(SimpleNamespace(pg_version=180001), run) == []
    assert logical.statistics_left_out(SimpleNamespace(pg_version=170006), SimpleNamespace(details={})) == []


def test_parallel_restore_uses_a_private_scratch_file_and_removes_it(
    server, sample_cluster, passphrase_file, backup_root, settings
):
    settings.RESTORE_JOBS = 2
    run = take_backup()
    assert restore_json(str(run.pk), "--into-database", "restored_j2")["status"] == "succeeded"
    with sample_cluster.connect("restored_j2") as b:
        assert sampledata.counts(b)["public.audit_logs"] == run.details["row_counts"]["public.audit_logs"]
    assert list((Path(settings.VAR_DIR) / "scratch").iterdir()) == []


def test_a_parallel_restore_whose_schema_fails_beside_the_decryption_leaves_nothing_and_keeps_the_copy_good(
    server, sample_cluster, passphrase_file, backup_root, settings
):
    """The schema (pre-data, from the table of contents while gpg writes the scratch file) fails:
    the table's owner is gone. The copy is not blamed; no database, file or pg_restore is left."""
    settings.RESTORE_JOBS = 2
    sample_cluster.execute("CREATE ROLE vanishing_owner NOLOGIN")
    sample_cluster.execute("ALTER TABLE audit_logs OWNER TO vanishing_owner", dbname="reliabilitymaldives")
    run = take_backup()
    sample_cluster.execute("ALTER TABLE audit_logs OWNER TO postgres", dbname="reliabilitymaldives")
    sample_cluster.execute("DROP ROLE vanishing_owner")
    before = databases(sample_cluster)
    result = restore_json(str(run.pk), "--into-database", "restored_no_owner")
    assert result["status"] == "failed", result
    assert result["error"].startswith("pg_restore: ") and "vanishing_owner" in result["error"], result["error"]
    assert databases(sample_cluster) == before
    assert list((Path(settings.VAR_DIR) / "scratch").iterdir()) == []
    assert BackupCopy.Status.BAD not in set(run.copies.values_list("status", flat=True))
    assert not [p for p in psutil.Process().children(recursive=True) if p.name() in ("pg_restore", "gpg")]


def test_a_table_of_contents_that_differs_from_the_restored_copy_fails_the_restore_and_leaves_nothing(
    server, sample_cluster, passphrase_file, backup_root, settings, monkeypatch
):
    """The schema is restored from the start read_properties decrypted; should the copy's start
    read differently during the restore, what was made from it is not kept."""
    from restores import dbprops

    settings.RESTORE_JOBS = 2
    run = take_backup()
    read_toc = dbprops.read_toc

    def unstable(*args):
        listing, head = read_toc(*args)
        return listing, head[:-1] + bytes([head[-1] ^ 0xFF])  # a byte past what pre-data reads

    monkeypatch.setattr(dbprops, "read_toc", unstable)
    before = databases(sample_cluster)
    result = restore_json(str(run.pk), "--into-database", "restored_unstable")
    assert result["status"] == "failed" and "read differently twice" in result["error"], result
    assert databases(sample_cluster) == before
    assert list((Path(settings.VAR_DIR) / "scratch").iterdir()) == []
    assert BackupCopy.Status.BAD not in set(run.copies.values_list("status", flat=True))


def test_the_restore_sessions_sort_in_memory_and_commit_without_waiting(server, settings):
    from restores.pgrestore import tool_for

    settings.RESTORE_MAINTENANCE_WORK_MEM = "300MB"
    tool = tool_for(server, "somewhere", "pg_restore")
    assert tool.env["PGOPTIONS"] == (
        "-c search_path=pg_catalog,pg_temp -c statement_timeout=0 -c lock_timeout=0"
        " -c idle_in_transaction_session_timeout=0"  # every tool's (Server.libpq_env), then the restore's own
        " -c maintenance_work_mem=300MB -c synchronous_commit=off -c default_transaction_read_only=off"
    )


def test_a_scratch_file_left_by_a_killed_restore_is_removed_by_the_next(server, passphrase_file, backup_root, settings):
    settings.RESTORE_JOBS = 2
    scratch = Path(settings.VAR_DIR) / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    dead = scratch / "restore-999999999-abc"
    dead.mkdir()
    (dead / "dump").write_bytes(b"PGDMP plaintext left by a SIGKILLed worker")
    run = take_backup()
    assert restore_json(str(run.pk), "--into-database", "after_kill")["status"] == "succeeded"
    assert list(scratch.iterdir()) == []


def test_restore_onto_another_server_brings_the_globals_first(
    server, sample_cluster, pg_base_dir, pg_template, passphrase_file, backup_root
):
    from backupportal.lib.pgcluster import Cluster

    sample_cluster.execute("CREATE ROLE ledger_owner NOLOGIN")
    sample_cluster.execute("ALTER TABLE financial_records OWNER TO ledger_owner", dbname="reliabilitymaldives")
    run = take_backup()
    other = Cluster.create(base_dir=pg_base_dir, template=pg_template)
    other.start()
    try:
        register(other, name="standby", dbname="postgres")
        result = restore_json(str(run.pk), "--into-database", "reliabilitymaldives", "--into-server", "standby")
        assert result["status"] == "succeeded", result
        owner = other.execute(
            "SELECT tableowner FROM pg_tables WHERE tablename = 'financial_records'", dbname="reliabilitymaldives"
        )
        assert owner == [("ledger_owner",)]
    finally:
        other.destroy()


@pytest.mark.parametrize(
    "args, message",
    [
        (["999999", "--into-database", "x"], "there is no backup run #999999"),
        (["{run}", "--into-database", "reliabilitymaldives"], "database reliabilitymaldives already exists"),
        (["{run}", "--into-database", "Bad-Name"], "not a valid database name"),
        (["{run}"], "say where to restore"),
        (["{run}", "--into-database", "x", "--into-server", "nope"], "unknown server 'nope'"),
        # Options of the other kind of restore were ignored: a logical restore done, exit 0.
        (
            ["{run}", "--into-database", "x", "--target-time", "2000-01-01 00:00:00+00:00"],
            "--target-time: for a PITR (--server NAME), not a logical restore (RUN_ID): leave them out",
        ),
        (["{run}", "--into-database", "x", "--target", "latest", "--port", "1"], "--target, --port: for a PITR"),
        (["--server", "maldives", "--replace", "--target", "latest"], "--replace: for a logical restore"),
        (["--server", "maldives", "--into-database", "x", "--target", "latest"], "--into-database: for a logical"),
        (["{run}", "--replace", "--request", "1", "--into-database", "x"], "--into-database: --replace restores"),
        (["{run}", "--into-database", "x", "--into-server", ""], "--into-server is empty"),
        (["--server", " ", "--target", "latest"], "--server is empty"),
    ],
)
def test_bad_restore_requests_are_refused_and_change_nothing(
    server, sample_cluster, passphrase_file, backup_root, args, message
):
    run = take_backup()
    before = databases(sample_cluster)
    args = [a.format(run=run.pk) for a in args]
    result = None
    try:
        result = restore_json(*args)
    except CommandError as e:
        assert message in str(e)
    else:
        assert result["status"] == "failed" and message in result["error"]
    assert databases(sample_cluster) == before


def test_a_failed_or_deleted_run_is_refused(server, passphrase_file, backup_root):
    failed = BackupRun.objects.create(server=server, kind="logical", status="failed")
    with pytest.raises(CommandError, match="it has no artifact"):
        call_command("restore", str(failed.pk), "--into-database", "x")
    run = take_backup()
    from backups.copies import delete_run_artifacts

    delete_run_artifacts(run, "test")
    with pytest.raises(CommandError, match="deleted by retention"):
        call_command("restore", str(run.pk), "--into-database", "x")


def test_a_wrong_passphrase_is_refused_and_changes_nothing(
    server, sample_cluster, passphrase_file, backup_root, settings
):
    run = take_backup()
    # The keyring's copy of the backup's passphrase (what a restore decrypts with) is wrong.
    key_id = run.copies.get(artifact="main").encryption_key_id
    (Path(settings.KEYRING_DIR) / f"{key_id}.passphrase").write_text("not the passphrase")
    before = databases(sample_cluster)
    result = restore_json(str(run.pk), "--into-database", "x")
    assert result["status"] == "failed" and "wrong passphrase or key" in result["error"]
    assert databases(sample_cluster) == before


def test_an_unreachable_server_is_refused(server, sample_cluster, passphrase_file, backup_root):
    run = take_backup()
    sample_cluster.stop()
    result = restore_json(str(run.pk), "--into-database", "x")
    assert result["status"] == "failed" and "connection refused" in result["error"]


def test_a_flipped_byte_is_caught_and_the_copy_marked_bad(server, sample_cluster, passphrase_file, backup_root):
    run = take_backup()
    artifact = backup_root / run.key
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    before = databases(sample_cluster)
    result = restore_json(str(run.pk), "--into-database", "x")
    assert result["status"] == "failed"
    assert databases(sample_cluster) == before
    assert run.copies.get(artifact="main").status == BackupCopy.Status.BAD


def strategy_tables_are_critical(server):
    """The strategy's four tables, as the demo registers them (a new server has none)."""
    database = Database.of_dsn(server)
    database.critical_tables = ["public.users", "public.roles", "public.audit_logs", "public.financial_records"]
    database.save(update_fields=["critical_tables"])


@pytest.mark.parametrize("pg_major", [15, 18])  # on 18 too: tests/test_pg18.py
def test_restoretest_passes_on_a_good_backup(server, passphrase_file, backup_root, sample_cluster):
    strategy_tables_are_critical(server)
    take_backup()
    ValidationCheck.objects.create(
        server=server, name="admins exist", sql="SELECT count(*) > 0 FROM public.users WHERE role_id = 1", expected="t"
    )
    out = StringIO()
    call_command("restoretest", "maldives", "--json", stdout=out)
    result = json.loads(out.getvalue().splitlines()[-1])
    assert result["status"] == "passed", result["checks"]
    assert {c["name"] for c in result["checks"]} >= {
        "restore",
        "rows in public.users",
        "rows in public.audit_logs",
        "row counts of every table",
        "check: admins exist",
    }
    assert result["duration_s"] > 0
    assert not [d for d in databases(sample_cluster) if d.startswith("restoretest_")]  # scratch dropped
    assert not Alert.objects.filter(condition="restore_test_failed").exists()


def test_restoretest_fails_with_an_alert_on_a_backup_whose_table_was_emptied(
    server, sample_cluster, passphrase_file, backup_root
):
    strategy_tables_are_critical(server)
    take_backup()
    sample_cluster.execute("DELETE FROM audit_logs", dbname="reliabilitymaldives")
    take_backup()
    with pytest.raises(SystemExit):
        call_command("restoretest", "maldives", stdout=StringIO())
    test = RestoreTest.objects.latest("started_at")
    assert test.status == "failed"
    assert "audit_logs is empty" in test.error
    alert = Alert.objects.get(condition="restore_test_failed", state="open")
    assert "audit_logs" in alert.message


def test_restoretest_fails_when_a_table_shrank_past_the_threshold(server, sample_cluster, passphrase_file, backup_root):
    strategy_tables_are_critical(server)
    take_backup()
    sample_cluster.execute("DELETE FROM financial_records WHERE id % 2 = 0", dbname="reliabilitymaldives")
    take_backup()
    with pytest.raises(SystemExit):
        call_command("restoretest", "maldives", stdout=StringIO())
    assert "down 50%" in RestoreTest.objects.latest("started_at").error


def test_restoretest_fails_on_a_corrupted_artifact_and_resolves_when_fixed(server, passphrase_file, backup_root):
    run = take_backup()
    artifact = backup_root / run.key
    good = artifact.read_bytes()
    artifact.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    with pytest.raises(SystemExit):
        call_command("restoretest", "maldives", stdout=StringIO())
    assert RestoreTest.objects.latest("started_at").status == "failed"
    assert Alert.objects.get(condition="restore_test_failed").state == "open"
    take_backup()
    call_command("restoretest", "maldives", stdout=StringIO())
    assert RestoreTest.objects.latest("started_at").status == "passed"
    assert Alert.objects.get(condition="restore_test_failed").state == "resolved"


def test_restoretest_with_no_backup_fails_clearly(server):
    err = StringIO()
    with pytest.raises(SystemExit):
        call_command("restoretest", "maldives", stdout=StringIO(), stderr=err)
    assert "no good logical backup" in RestoreTest.objects.get().error
    assert err.getvalue() == "restore test failed: backup: no good logical backup to test: take one first\n"


def test_the_monthly_test_runs_on_the_first_sunday_of_each_month_and_only_then():
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from croniter import croniter

    from backups.models import BackupSchedule

    cron = BackupSchedule.DEFAULT_CRON[BackupSchedule.Job.MONTHLY_RESTORE_TEST]
    tz = ZoneInfo("Indian/Maldives")
    it = croniter(cron, datetime(2026, 12, 31, 12, 0, tzinfo=tz))
    fired = [it.get_next(datetime) for _ in range(12)]
    assert all(d.year == 2027 for d in fired)
    for d in fired:
        assert d.weekday() == 6 and d.day <= 7 and (d.hour, d.minute) == (3, 0), d
    assert [d.month for d in fired] == list(range(1, 13))


def test_the_server_page_shows_the_last_test_its_rto_and_the_untested_backups(
    client, alice, server, passphrase_file, backup_root
):
    first = take_backup()
    client.force_login(alice)
    client.post(reverse("restore-test-now", args=[server.name]))  # tasks run inline in tests
    second = take_backup()
    page = client.get(reverse("server", args=[server.name])).content.decode()
    test = RestoreTest.objects.get()
    assert test.status == "passed" and test.backup_run == first
    from django.template.defaultfilters import floatformat

    assert f"{floatformat(test.duration_s, 1)} s against 240 min (critical)" in page
    untested = page.split("Never restore-tested")[1].split("</tr>")[0]
    assert f"#{second.pk}<" in untested and f"#{first.pk}<" not in untested


LOGIN_TRIGGER = """
CREATE TABLE login_log(who text, at timestamptz DEFAULT now());
CREATE FUNCTION log_login() RETURNS event_trigger LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO public.login_log(who) VALUES (session_user); END$$;
CREATE EVENT TRIGGER log_logins ON login EXECUTE FUNCTION log_login();
"""


@pytest.mark.parametrize("pg_major", [18])  # login triggers and event_triggers = off are 17's
@pytest.mark.parametrize("jobs", [1, 2])  # piped, and from the scratch file
def test_productions_login_trigger_fires_on_none_of_the_portals_sessions_in_a_restored_copy(
    server, sample_cluster, passphrase_file, backup_root, settings, jobs
):
    settings.RESTORE_JOBS = jobs
    sample_cluster.execute(LOGIN_TRIGGER, dbname="reliabilitymaldives")
    run = take_backup()
    logged = run.details["row_counts"]["public.login_log"]
    assert logged >= 1  # the backup's own sessions logged in

    # The restore's own sessions (properties, the WAL flush) and the restore test's checks:
    # one row more would fail "row counts of every table".
    out = StringIO()
    call_command("restoretest", "maldives", "--json", stdout=out)
    result = json.loads(out.getvalue().splitlines()[-1])
    assert result["status"] == "passed", result["checks"]

    assert restore_json(str(run.pk), "--into-database", "restored_copy")["status"] == "succeeded"
    with sample_cluster.connect("restored_copy", options="-c event_triggers=off") as copy:
        assert copy.execute("SELECT count(*) FROM login_log").fetchone()[0] == logged
        assert copy.execute("SELECT evtenabled FROM pg_event_trigger").fetchall() == [("O",)]  # kept as it was


@pytest.mark.parametrize("pg_major", [18])
def test_a_role_that_may_not_turn_event_triggers_off_still_connects_to_a_copy(sample_cluster, db):
    from backups.models import Server
    from restores import targetdb

    sample_cluster.execute(LOGIN_TRIGGER, dbname="reliabilitymaldives")
    sample_cluster.execute(
        "CREATE ROLE plain LOGIN PASSWORD 'plain-pw'; GRANT INSERT ON login_log TO plain", dbname="reliabilitymaldives"
    )
    plain = Server(name="plain", dsn=sample_cluster.dsn("reliabilitymaldives", user="plain"), password="plain-pw")
    plain.pg_version = plain.probe()
    superuser = register(sample_cluster)

    logins = "SELECT who, count(*) FROM login_log GROUP BY who ORDER BY who"
    before = dict(sample_cluster.execute(logins, dbname="reliabilitymaldives"))
    with targetdb.connect_to_copy(plain, "reliabilitymaldives") as conn:
        assert conn.execute("SHOW event_triggers").fetchone() == ("on",)  # refused, so connected without it
    with targetdb.connect_to_copy(superuser, "reliabilitymaldives") as conn:
        assert conn.execute("SHOW event_triggers").fetchone() == ("off",)
    after = dict(sample_cluster.execute(logins, dbname="reliabilitymaldives"))
    # One login more of plain's (the refused attempt never logged in), none of the superuser's;
    # the query itself is the test's own login.
    assert after == {"plain": before["plain"] + 1, "postgres": before["postgres"] + 1}


FROZEN_DDL = """
CREATE SUBSCRIPTION feed CONNECTION 'host=127.0.0.1 port=1 dbname=nowhere' PUBLICATION pub WITH (connect = false);
CREATE FUNCTION refuse_ddl() RETURNS event_trigger LANGUAGE plpgsql AS
  $$BEGIN RAISE EXCEPTION 'DDL is frozen on this database'; END$$;
CREATE EVENT TRIGGER frozen ON ddl_command_start EXECUTE FUNCTION refuse_ddl();
"""


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_ddl_trigger_of_productions_does_not_stop_the_restores_own_statements(
    server, sample_cluster, passphrase_file, backup_root, settings, jobs
):
    """A guard that refuses DDL would refuse detaching the copy's subscription from production's
    slot: the trigger is created last, once the restore is done there."""
    settings.RESTORE_JOBS = jobs
    sample_cluster.execute(FROZEN_DDL, dbname="reliabilitymaldives")
    run = take_backup()
    result = restore_json(str(run.pk), "--into-database", "restored_copy")
    assert result["status"] == "succeeded with warnings", result  # the subscription detached: said
    assert any("was disabled and detached from slot feed" in w for w in result["warnings"]), result["warnings"]
    assert "1 event trigger(s) created last, after the restore's own statements in the copy" in result["notes"]
    with sample_cluster.connect("restored_copy") as copy:
        mine = "SELECT subslotname, subenabled FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid"
        assert copy.execute(mine + " WHERE d.datname = current_database()").fetchall() == [(None, False)]
        assert copy.execute("SELECT evtname, evtevent, evtenabled FROM pg_event_trigger").fetchall() == [
            ("frozen", "ddl_command_start", "O")
        ]


def test_event_triggers_are_not_created_from_a_table_of_contents_the_restored_copy_does_not_begin_with(
    server, sample_cluster, passphrase_file, backup_root, settings, monkeypatch
):
    """Piped, nothing checks the start read first against the copy: the held-back triggers would
    be created from bytes no sha256 covered. The restore fails and leaves nothing."""
    from restores import dbprops

    settings.RESTORE_JOBS = 1
    sample_cluster.execute(LOGIN_TRIGGER.replace("ON login", "ON ddl_command_end"), dbname="reliabilitymaldives")
    run = take_backup()
    read_toc = dbprops.read_toc

    def unstable(*args):
        listing, head = read_toc(*args)
        return listing, head[:-1] + bytes([head[-1] ^ 0xFF])

    monkeypatch.setattr(dbprops, "read_toc", unstable)
    before = databases(sample_cluster)
    result = restore_json(str(run.pk), "--into-database", "restored_unstable")
    assert result["status"] == "failed", result
    assert (
        "is not the start of the copy restored" in result["error"]
        and "event triggers were not created" in result["error"]
    )
    assert databases(sample_cluster) == before
    assert list((Path(settings.VAR_DIR) / "scratch").iterdir()) == []
