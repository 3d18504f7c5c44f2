"""A server is a cluster holding databases: one physical protection for the cluster, a logical
backup per database, and nothing left uncovered (a new database, one the portal cannot reach,
a dropped one). Real clusters throughout."""

import re

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from backups.models import BackupRun, Database, Server
from backups.tasks import scheduled_job
from tests.helpers import DSN_PASSWORD, enable_push, run_command
from watching import monitor
from watching.models import Alert

pytestmark = pytest.mark.django_db
pytest_plugins = ["tests.walfixtures"]


@pytest.fixture
def cluster_of_three(sample_cluster, passphrase_file, backup_root):
    """reliabilitymaldives, shop and hr (and postgres) on one cluster, a table in each."""
    for name in ("shop", "hr"):
        sample_cluster.create_database(name)
        sample_cluster.execute(f"CREATE TABLE {name}_rows AS SELECT g AS id FROM generate_series(1, 50) g", dbname=name)
    yield sample_cluster
    for (name,) in sample_cluster.execute("SELECT datname FROM pg_database WHERE datname IN ('later', 'secret')"):
        sample_cluster.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def add(cluster, *extra, user="postgres"):
    result = run_command("addserver", "maldives", "--dsn", cluster.dsn("reliabilitymaldives", user=user), *extra)
    assert result["_exit"] == 0, result
    return result


def uncovered_alerts():
    """{"database NAME": what is said of it} from the server's one open "Database not backed up" alert."""
    return {
        said.split(" on ")[0]: said
        for a in Alert.objects.filter(condition="database_uncovered", subject="server:maldives").exclude(
            state="resolved"
        )
        for said in re.split(r"; (?=database )", a.message)
    }


def test_one_cluster_three_databases_one_base_backup_and_a_logical_run_each(cluster_of_three, wal_spool):
    added = add(cluster_of_three, "--databases", "all")
    assert [d["name"] for d in added["databases"]] == ["hr", "postgres", "reliabilitymaldives", "shop"]
    enable_push(cluster_of_three)  # the cluster's WAL is archived once, whatever it holds

    logical = run_command("backup", "maldives", "--kind", "logical")
    assert logical["_exit"] == 0 and logical["status"] == "succeeded"
    assert sorted(r["database"] for r in logical["runs"]) == ["hr", "postgres", "reliabilitymaldives", "shop"]
    base = run_command("backup", "maldives", "--kind", "base")
    assert base["status"] == "succeeded", base
    assert base["database"] is None  # the whole cluster, once

    runs = BackupRun.objects.good()
    assert runs.filter(kind="base").count() == 1 and runs.filter(kind="logical").count() == 4
    shop = runs.get(database__name="shop")
    assert shop.details["database"] == "shop" and shop.details["row_counts"] == {"public.shop_rows": 50}
    # One database alone, by name; a name the server does not back up is refused in one line.
    assert run_command("backup", "maldives", "--database", "hr")["database"] == "hr"
    refused = run_command("backup", "maldives", "--database", "nosuch")
    assert refused["_exit"] == 1 and "does not back up a database named 'nosuch'" in refused["_stderr"]
    assert "whole cluster" in run_command("backup", "maldives", "--kind", "base", "--database", "hr")["_stderr"]


def test_the_default_is_the_dsns_database_alone_as_before(cluster_of_three):
    add(cluster_of_three)
    result = run_command("backup", "maldives")
    assert result["database"] == "reliabilitymaldives" and "runs" not in result
    assert list(Database.objects.filter(protected=True).values_list("name", flat=True)) == ["reliabilitymaldives"]
    # The others are known, and shown as not chosen: nothing on the cluster goes unseen.
    assert list(Database.objects.filter(protected=False).values_list("name", flat=True)) == ["hr", "postgres", "shop"]


def test_a_database_created_later_is_alerted_then_backed_up_at_the_next_pass(cluster_of_three, settings):
    add(cluster_of_three, "--databases", "all")
    scheduled_job("maldives", "logical", scheduled_for="2026-12-03T02:00:00+05:00")
    monitor.check_databases(Server.objects.get())
    assert uncovered_alerts() == {}

    cluster_of_three.create_database("later")
    from backups.databases import discover

    discover(Server.objects.get())  # what the daily pass does first
    monitor.check_databases(Server.objects.get())
    assert "has no backup yet" in uncovered_alerts()["database later"]

    scheduled_job("maldives", "logical", scheduled_for="2026-12-04T02:00:00+05:00")
    assert BackupRun.objects.good().filter(database__name="later").count() == 1
    monitor.check_databases(Server.objects.get())
    assert uncovered_alerts() == {}


def test_a_database_the_portal_cannot_connect_to_is_a_gap_not_skipped(cluster_of_three, monkeypatch):
    cluster_of_three.create_role("portal", password=DSN_PASSWORD)  # not a superuser: CONNECT applies
    monkeypatch.setenv("PGPASSWORD", DSN_PASSWORD)
    cluster_of_three.execute("GRANT pg_read_all_data TO portal")
    cluster_of_three.create_database("secret")
    cluster_of_three.execute("REVOKE CONNECT ON DATABASE secret FROM PUBLIC")
    add(cluster_of_three, "--databases", "all", user="portal")
    secret = Database.objects.get(name="secret")
    assert secret.state == "unreachable" and "secret" in secret.problem

    result = run_command("backup", "maldives")
    assert result["_exit"] == 1 and result["status"] == "failed"
    failed = BackupRun.objects.get(database=secret)
    assert failed.status == "failed" and "database secret on maldives cannot be backed up" in failed.error
    assert BackupRun.objects.good().filter(kind="logical").count() == 4  # the others all went on
    monitor.check_databases(Server.objects.get())
    assert "cannot be backed up" in uncovered_alerts()["database secret"]

    cluster_of_three.execute("GRANT CONNECT ON DATABASE secret TO portal")
    assert run_command("backup", "maldives", "--database", "secret")["status"] == "succeeded"
    monitor.check_databases(Server.objects.get())
    assert uncovered_alerts() == {}


def test_two_databases_the_portal_cannot_connect_to_are_one_alert_until_both_are_backed_up(
    cluster_of_three, monkeypatch
):
    cluster_of_three.create_role("portal", password=DSN_PASSWORD)  # not a superuser: CONNECT applies
    monkeypatch.setenv("PGPASSWORD", DSN_PASSWORD)
    cluster_of_three.execute("GRANT pg_read_all_data TO portal")
    for name in ("later", "secret"):
        cluster_of_three.create_database(name)
        cluster_of_three.execute(f"REVOKE CONNECT ON DATABASE {name} FROM PUBLIC")
    add(cluster_of_three, "--databases", "all", user="portal")
    run_command("backup", "maldives")  # the others are backed up; these two fail
    server = Server.objects.get()
    monitor.check_databases(server)
    alert = Alert.objects.get(condition="database_uncovered")
    assert alert.subject == "server:maldives" and sorted(uncovered_alerts()) == ["database later", "database secret"]

    cluster_of_three.execute("GRANT CONNECT ON DATABASE secret TO portal")
    assert run_command("backup", "maldives", "--database", "secret")["status"] == "succeeded"
    monitor.check_databases(server)
    assert list(uncovered_alerts()) == ["database later"]  # the same alert, saying less
    assert Alert.objects.get(condition="database_uncovered").pk == alert.pk

    cluster_of_three.execute("GRANT CONNECT ON DATABASE later TO portal")
    assert run_command("backup", "maldives", "--database", "later")["status"] == "succeeded"
    monitor.check_databases(server)
    assert uncovered_alerts() == {} and Alert.objects.get(condition="database_uncovered").state == "resolved"


def test_a_dropped_database_keeps_its_backups_and_shows_as_dropped(cluster_of_three, settings):
    from backups import retention

    add(cluster_of_three, "--databases", "shop,hr")
    assert run_command("backup", "maldives")["status"] == "succeeded"
    cluster_of_three.execute('DROP DATABASE "shop" WITH (FORCE)')

    result = run_command("backup", "maldives")
    assert result["database"] == "hr" and result["status"] == "succeeded"  # shop is not failed: it is gone
    shop = Database.objects.get(name="shop")
    assert shop.state == "gone" and shop.gone_at is not None
    # Its last backup outlives retention: nothing deletes the last good backup of a database.
    server = Server.objects.get()
    server.logical_retention_days = 0
    server.save()
    retention.apply()
    assert BackupRun.objects.good().filter(database=shop).count() == 1
    # hr: its newest, and the older one only if shop's kept run pairs with its globals file.
    newest_hr = BackupRun.objects.good().filter(database__name="hr").order_by("-finished_at").first()
    kept_hr = set(BackupRun.objects.good().filter(database__name="hr").values_list("pk", flat=True))
    assert kept_hr - {newest_hr.pk} <= BackupRun.objects.globals_in_use()
    monitor.check_databases(server)
    assert uncovered_alerts() == {}


def test_a_wrong_databases_option_is_refused_in_one_line(sample_cluster, passphrase_file):
    dsn = sample_cluster.dsn("reliabilitymaldives")
    result = run_command("addserver", "maldives", "--dsn", dsn, "--databases", "a,a")
    assert result["_exit"] == 1 and result["_stderr"].startswith("--databases: A database is named twice")
    mixed = run_command("addserver", "maldives", "--dsn", dsn, "--databases", "all,shop")
    assert mixed["_exit"] == 1 and mixed["_stderr"].startswith('--databases: "all" stands alone')
    assert not Server.objects.exists()


BEFORE = [("backups", "0008_plain_labels"), ("restores", "0008_plain_labels")]


def migrate(targets):
    """Migrate to `targets`; returns the models as they were there."""
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    executor.loader.build_graph()
    return executor.loader.project_state(targets).apps


def fill_catalog_as_before(old):
    """A server with a history, as the models before databases wrote it."""
    from django.utils import timezone

    server = old.get_model("backups", "Server").objects.create(
        name="atoll", dsn="postgresql://u@127.0.0.1:1/atolldb?sslmode=disable"
    )
    location = old.get_model("backups", "StorageLocation").objects.get(name="primary")
    Run = old.get_model("backups", "BackupRun")
    logical = Run.objects.create(server_id=server.pk, kind="logical", status="succeeded", key="atoll/l.dump.gpg")
    base = Run.objects.create(server_id=server.pk, kind="base", status="succeeded", key="atoll/b.tar.gpg")
    copy = old.get_model("backups", "BackupCopy").objects.create(
        run_id=logical.pk, location_id=location.pk, key=logical.key, status="ok", size=10
    )
    segment = old.get_model("backups", "WalSegment").objects.create(
        server_id=server.pk,
        timeline=1,
        name="000000010000000000000001",
        segno=1,
        key="atoll/wal/1",
        size=16,
        sha256="0" * 64,
        archived_at=timezone.now(),
    )
    restore = old.get_model("restores", "RestoreRun").objects.create(
        kind="logical", server_id=server.pk, backup_run_id=logical.pk, status="succeeded"
    )
    test = old.get_model("restores", "RestoreTest").objects.create(
        server_id=server.pk, backup_run_id=logical.pk, status="passed"
    )
    return {
        "server": server.pk,
        "logical": logical.pk,
        "base": base.pk,
        "copy": copy.pk,
        "segment": segment.pk,
        "restore": restore.pk,
        "test": test.pk,
    }


@pytest.mark.django_db(transaction=True)
def test_a_catalog_from_before_becomes_a_cluster_with_its_one_database():
    from backupportal import journal
    from backups.models import BackupCopy, WalSegment
    from restores.models import RestoreRun, RestoreTest

    journal.record("server_added", actor="sam", server="atoll")  # entries from before must still verify
    try:
        ids = fill_catalog_as_before(migrate(BEFORE))
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())

    database = Database.objects.get(server_id=ids["server"])
    assert database.name == "atolldb" and database.protected and database.state == "present"
    assert BackupRun.objects.get(pk=ids["logical"]).database == database
    assert BackupRun.objects.get(pk=ids["base"]).database is None  # the whole cluster
    # Every row is still there and still leads where it did.
    assert BackupCopy.objects.get(pk=ids["copy"]).run_id == ids["logical"]
    assert WalSegment.objects.get(pk=ids["segment"]).server_id == ids["server"]
    assert RestoreRun.objects.get(pk=ids["restore"]).backup_run_id == ids["logical"]
    assert RestoreTest.objects.get(pk=ids["test"]).database == database  # a logical test: of its backup's
    ok, message, _ = journal.verify()
    assert ok, message


def test_the_weekly_restore_test_restores_every_database_and_a_failure_stays_alerted(cluster_of_three, settings):
    from restores.models import RestoreTest
    from restores.restoretest import scheduled_restore_tests

    add(cluster_of_three, "--databases", "shop,hr,reliabilitymaldives")
    assert run_command("backup", "maldives")["status"] == "succeeded"
    server = Server.objects.get()
    tests = scheduled_restore_tests(server, monthly=False)
    assert sorted(t.database.name for t in tests) == ["hr", "reliabilitymaldives", "shop"]
    assert {t.status for t in tests} == {"passed"}
    shop = next(t for t in tests if t.database.name == "shop")
    assert any("50" in c["detail"] for c in shop.checks)  # shop_rows compared: its own counts

    # A database the server should back up but has no backup of: its test fails, by name, and
    # the other databases' tests passing do not resolve the alert.
    cluster_of_three.create_database("later")
    server.protect_databases = "shop,hr,reliabilitymaldives,later"
    server.save()
    from backups.databases import discover

    discover(server)
    tests = scheduled_restore_tests(server, monthly=False)
    later = next(t for t in tests if t.database.name == "later")
    assert later.status == "failed" and "no good logical backup of database later" in later.error
    assert [t.pk for t in RestoreTest.objects.failing(server)] == [later.pk]
    monitor.check_restore_tests(server)
    assert Alert.objects.get(condition="restore_test_failed", state="open").message.count("failed") == 1


def test_the_coverage_page_lists_every_database_with_its_gaps_and_an_auditor_reads_it(
    cluster_of_three, client, charlie, alice, django_assert_max_num_queries
):
    from django.urls import reverse

    add(cluster_of_three, "--databases", "shop,reliabilitymaldives")
    assert run_command("backup", "maldives", "--database", "shop")["status"] == "succeeded"

    client.force_login(charlie)  # an auditor: read-only, and this page is his
    with django_assert_max_num_queries(20):
        page = client.get(reverse("coverage")).content.decode()
    # Every database of the cluster, the chosen ones and the others.
    for name in ("hr", "postgres", "reliabilitymaldives", "shop"):
        assert f"<strong>{name}</strong>" in page
    from watching import coverage

    gaps = {row.database.name: row.gaps for row in coverage.rows()}
    assert "no backup yet" in gaps["reliabilitymaldives"]
    assert "no offsite copy" in gaps["shop"] and "no restore test in 35 days" in gaps["shop"]
    assert "an RPO of 15 min needs WAL archiving" in gaps["shop"]  # declared 15 min, no archiving
    assert gaps["hr"] == [] and gaps["postgres"] == []  # not chosen: shown, not counted
    assert "no offsite copy" in page and "not chosen" in page

    client.force_login(alice)
    dashboard = client.get(reverse("dashboard")).content.decode()
    assert "2 databases short of their policy" in dashboard


def test_the_monitor_alerts_on_a_database_untested_for_35_days_until_a_test_passes(cluster_of_three):
    from datetime import timedelta

    from django.utils import timezone

    from restores.restoretest import scheduled_restore_tests

    add(cluster_of_three, "--databases", "shop")
    assert run_command("backup", "maldives")["status"] == "succeeded"
    server = Server.objects.get()
    monitor.check_coverage(server)
    assert not Alert.objects.filter(condition="coverage_gap").exists()  # found today: not owed yet

    Database.objects.filter(name="shop").update(first_seen_at=timezone.now() - timedelta(days=36))
    monitor.check_coverage(server)
    alert = Alert.objects.get(condition="coverage_gap", state="open")
    assert alert.message == "maldives is short of its policy: shop: no restore test in 35 days"

    assert [t.status for t in scheduled_restore_tests(server, monthly=False)] == ["passed"]
    monitor.check_coverage(server)
    alert.refresh_from_db()
    assert alert.state == "resolved"


def test_globals_are_dumped_once_a_pass_and_kept_while_a_run_pairs_with_them(
    cluster_of_three, pg_base_dir, pg_template
):
    from datetime import timedelta

    from django.utils import timezone

    from backups import retention
    from backups.models import BackupCopy

    add(cluster_of_three, "--databases", "shop,hr")
    # Retention by days alone: the floor (test_gfs) keeps only each database's newest.
    Server.objects.filter(name="maldives").update(retention_floor=1)
    for name in ("shop", "hr"):  # each owned by a role that only the globals file holds
        cluster_of_three.execute(f"CREATE ROLE {name}_owner LOGIN")
        cluster_of_three.execute(f"ALTER DATABASE {name} OWNER TO {name}_owner")
    result = run_command("backup", "maldives")
    assert result["status"] == "succeeded"
    first, second = (BackupRun.objects.get(pk=r["id"]) for r in result["runs"])
    # One file of roles and tablespaces for the cluster; both runs name it.
    assert BackupCopy.objects.filter(artifact="globals").count() == 1
    assert first.details["globals"]["key"] == second.details["globals"]["key"]
    assert second.details["globals"]["run"] == first.pk and second.globals_run() == first

    # A backup of one database alone dumps its own: roles made since the pass are in it.
    alone = run_command("backup", "maldives", "--database", first.database.name)
    assert "run" not in BackupRun.objects.get(pk=alone["id"]).details["globals"]

    # The run that dumped them outlives its retention while the other is kept: it stays, whole.
    BackupRun.objects.filter(pk=first.pk).update(finished_at=timezone.now() - timedelta(days=40))
    BackupRun.objects.filter(pk=second.pk).update(finished_at=timezone.now() - timedelta(days=1))
    retention.apply()
    assert BackupRun.objects.get(pk=first.pk).deleted_at is None
    assert BackupCopy.objects.get(run=first, artifact="globals").status == "ok"
    # Onto another cluster, where the database's owner exists only in the globals file.
    from backupportal.lib.pgcluster import Cluster
    from tests.helpers import register

    with Cluster.create(base_dir=pg_base_dir, template=pg_template) as island:
        register(island, name="island", dbname="postgres")
        restored = run_command(
            "restore", str(second.pk), "--into-database", second.database.name, "--into-server", "island"
        )
        assert restored["status"].startswith("succeeded"), restored
        owner = island.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", [second.database.name]
        )
        assert owner == [(f"{second.database.name}_owner",)]

    # The last run naming them goes: so does it, at the next retention pass.
    BackupRun.objects.filter(pk=second.pk).update(deleted_at=timezone.now())
    retention.apply()
    assert BackupRun.objects.get(pk=first.pk).deleted_at is not None
    assert BackupCopy.objects.get(run=first, artifact="globals").status == "deleted"


def test_one_databases_failure_stays_alerted_while_others_succeed_and_a_wrong_name_stays_a_gap(cluster_of_three):
    add(cluster_of_three, "--databases", "hr,shop,shopp")  # shopp: a typo
    result = run_command("backup", "maldives")
    assert result["status"] == "failed" and result["_exit"] == 1
    assert result["_stderr"].count("\n") <= 1 and "there is no database shopp on the cluster" in result["_stderr"]
    assert run_command("backup", "maldives")["status"] == "failed"  # the next pass: still a gap, not "dropped"
    shopp = Database.objects.get(name="shopp")
    assert shopp.state == "unreachable" and "check the name" in shopp.problem

    server = Server.objects.get()
    monitor.alert_backup_failures(server)
    alert = Alert.objects.get(condition="backup_failed", state="open")
    assert "maldives/shopp" in alert.message and "hr" not in alert.message

    # Scratch databases the portal makes itself are never part of "all".
    cluster_of_three.create_database("restoretest_12_20261203020000")
    server.protect_databases = "all"
    server.save()
    from backups.databases import discover

    names = {db.name for db in discover(server)}
    assert "restoretest_12_20261203020000" not in names and {"hr", "shop"} <= names
    cluster_of_three.execute('DROP DATABASE "restoretest_12_20261203020000"')
