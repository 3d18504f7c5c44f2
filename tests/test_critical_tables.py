"""Restore tests work on any database: every table counted and compared, critical tables chosen by DBAs.

The `shop` database has none of the strategy's tables: a schema of its own, a quoted name
with a dot and a capital in it, a partitioned table, an inheritance parent and child, and a
view, a materialized view and a temporary table that are not the database's data.
"""

import json
from io import StringIO

import psycopg
import pytest
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from backupportal.models import JournalEntry
from backups.models import BackupRun, ChangeRequest, Database, Server
from restores.models import RestoreTest
from tests.helpers import make_user, register

SHOP = """
CREATE TABLE customers (id int PRIMARY KEY, name text);
INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 30) g;
CREATE SCHEMA sales;
CREATE TABLE sales."Order.Items" (id int, customer int);
INSERT INTO sales."Order.Items" SELECT g, g % 30 + 1 FROM generate_series(1, 70) g;
CREATE TABLE measurements (at date NOT NULL, value int) PARTITION BY RANGE (at);
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE measurements_2026 PARTITION OF measurements FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO measurements SELECT date '2025-06-01' + g, g FROM generate_series(1, 400) g;
CREATE TABLE events (id int);
CREATE TABLE events_archived () INHERITS (events);
INSERT INTO events SELECT generate_series(1, 5);
INSERT INTO events_archived SELECT generate_series(1, 8);
CREATE TABLE "order" (id int);
INSERT INTO "order" VALUES (1);
CREATE VIEW big_customers AS SELECT * FROM customers WHERE id > 10;
CREATE MATERIALIZED VIEW customer_count AS SELECT count(*) FROM customers;
"""

EVERY_TABLE = {
    "public.customers": 30,
    'sales."Order.Items"': 70,
    "public.measurements_2025": 213,  # 2025-06-02 .. 2025-12-31
    "public.measurements_2026": 187,
    "public.events": 5,  # its own rows only: the child's are counted in the child
    "public.events_archived": 8,
    'public."order"': 1,
}


@pytest.fixture
def shop(pg_cluster, db):
    pg_cluster.create_database("shop")
    with pg_cluster.connect("shop") as conn:
        conn.execute(SHOP)
    return register(pg_cluster, name="shop", dbname="shop")


def backup(name):
    call_command("backup", name, stdout=StringIO())
    return BackupRun.objects.filter(status="succeeded").latest("created_at")


def restoretest(name):
    out = StringIO()
    try:
        call_command("restoretest", name, "--json", stdout=out)
    except SystemExit:
        pass
    return json.loads(out.getvalue().strip().splitlines()[-1])


def checks(result):
    return {c["name"]: c for c in result["checks"]}


def critical(server, name=None):
    """The critical tables of one of the server's databases (default: the DSN's)."""
    database = Database.objects.get(server=server, name=name) if name else Database.of_dsn(server)
    return database.critical_tables


def choose(server, tables):
    Database.of_dsn(server)
    Database.objects.filter(server=server, name=server.dbname).update(critical_tables=tables)


def test_a_new_server_has_no_critical_tables(shop):
    assert critical(shop) == []
    assert Database(server=shop, name="x").critical_tables == []


def test_a_backup_records_every_table_by_its_qualified_name(shop, passphrase_file, backup_root, pg_cluster):
    with pg_cluster.connect("shop") as conn:
        conn.execute("CREATE TEMPORARY TABLE scratch AS SELECT 1")  # another session's: not in the dump
        run = backup("shop")
    assert run.details["row_counts"] == EVERY_TABLE


def test_a_good_backup_of_a_database_without_the_strategys_tables_passes(shop, passphrase_file, backup_root):
    backup("shop")
    result = restoretest("shop")
    assert result["status"] == "passed", result
    every = checks(result)["row counts of every table"]
    assert every["ok"] and every["detail"] == "7 tables, each with the rows recorded at backup time"


def test_a_critical_table_emptied_before_the_backup_fails_naming_it(shop, pg_cluster, passphrase_file, backup_root):
    call_command(
        "addserver", "shop2", "--dsn", pg_cluster.dsn("shop"), "--critical-tables", 'customers,sales."Order.Items"'
    )
    server = Server.objects.get(name="shop2")
    assert critical(server) == ["public.customers", 'sales."Order.Items"']
    backup("shop2")
    assert restoretest("shop2")["status"] == "passed"
    pg_cluster.execute('DELETE FROM sales."Order.Items"', dbname="shop")
    backup("shop2")
    result = restoretest("shop2")
    assert result["status"] == "failed"
    failed = [c for c in result["checks"] if not c["ok"]]
    assert failed == [
        {
            "name": 'rows in sales."Order.Items"',
            "ok": False,
            "detail": 'sales."Order.Items" is empty: a critical table must hold rows',
        }
    ]
    test = RestoreTest.objects.get(pk=result["id"])
    assert 'sales."Order.Items" is empty' in test.error
    # Every count still matched the dump's snapshot: the backup is faithful, the data is not.
    assert checks(result)["row counts of every table"]["ok"]


def test_a_partitioned_critical_table_is_held_to_the_sum_of_its_partitions(
    shop, pg_cluster, passphrase_file, backup_root
):
    choose(shop, ["public.measurements"])
    before = backup("shop")
    pg_cluster.execute("DELETE FROM measurements WHERE value % 2 = 0", dbname="shop")
    backup("shop")
    result = restoretest("shop")
    assert result["status"] == "failed"
    assert checks(result)["rows in public.measurements"]["detail"] == (
        f"200 rows, down 50% from 400 in backup #{before.pk} (threshold 20%)"
    )


def test_a_count_that_differs_from_the_snapshot_fails_whichever_table_it_is(shop, passphrase_file, backup_root):
    run = backup("shop")
    run.details["row_counts"]["public.events_archived"] = 9  # as if the dump had lost a row
    run.save(update_fields=["details"])
    result = restoretest("shop")
    assert result["status"] == "failed"
    every = checks(result)["row counts of every table"]
    assert every == {
        "name": "row counts of every table",
        "ok": False,
        "detail": "1 of 7 tables differ from the backup: public.events_archived: 8 rows restored, 9 recorded",
    }


def test_a_restore_test_that_checked_no_table_fails(pg_cluster, db, passphrase_file, backup_root):
    pg_cluster.create_database("empty")
    register(pg_cluster, name="empty", dbname="empty")
    assert backup("empty").details["row_counts"] == {}
    result = restoretest("empty")
    assert result["status"] == "failed"
    assert "no tables checked" in RestoreTest.objects.get(pk=result["id"]).error


def test_runs_recorded_with_unqualified_names_are_still_compared(server, sample_cluster, passphrase_file, backup_root):
    """Before every table was counted, runs named only the critical tables, without schema."""
    choose(server, ["users", "audit_logs"])  # as older versions stored them
    older = backup("maldives")
    older.details["row_counts"] = {"users": 200, "audit_logs": 4000}
    older.save(update_fields=["details"])
    newest = backup("maldives")
    newest.details["row_counts"] = {"users": 200, "audit_logs": 2000, "roles": None}
    newest.save(update_fields=["details"])
    result = restoretest("maldives")
    found = checks(result)
    assert found["rows in public.users"] == {
        "name": "rows in public.users",
        "ok": True,
        "detail": "200 rows, as recorded at backup time",
    }
    assert found["rows in public.audit_logs"]["detail"] == (
        f"2000 rows, down 50% from 4000 in backup #{older.pk} (threshold 20%)"
    )
    assert found["row counts of every table"]["detail"] == "2 tables, each with the rows recorded at backup time"


def test_addserver_refuses_a_critical_table_that_does_not_exist(pg_cluster, db):
    pg_cluster.create_database("shop")
    with pytest.raises(CommandError) as e:
        call_command("addserver", "shop", "--dsn", pg_cluster.dsn("shop"), "--critical-tables", "customers,orders")
    assert str(e.value) == (
        "--critical-tables: customers does not exist in database shop; orders does not exist in database shop: "
        "give existing tables as table or schema.table"
    )
    assert not Server.objects.exists()


def test_a_dba_chooses_critical_tables_on_the_server_page_and_it_is_journaled(client, alice, shop):
    client.force_login(alice)
    url = reverse("critical-tables-edit", args=["shop"])
    database = Database.of_dsn(shop)
    field = f"db{database.pk}-tables"
    response = client.post(url, {"database": database.pk, field: 'customers\nsales."Order.Items", measurements'})
    assert response.status_code == 302
    assert critical(shop) == ["public.customers", 'sales."Order.Items"', "public.measurements"]
    entry = JournalEntry.objects.get(action="critical_tables_changed")
    assert entry.actor == "alice" and entry.server == "shop"
    assert entry.details == {"tables": critical(shop), "before": [], "database": "shop"}
    page = client.get(reverse("server", args=["shop"])).content.decode()
    assert "Critical tables of shop/shop: public.customers" in page

    response = client.post(url, {"database": database.pk, field: "customers, nope, big_customers, a.b.c"})
    assert response.status_code == 200
    form = next(f for f in response.context["critical_forms"] if f.database == database)
    error = form.errors["tables"][0]
    assert error == (
        "nope does not exist in database shop; big_customers is not a table; "
        "'a.b.c' has too many dots: give existing tables as table or schema.table"
    )
    assert len(critical(shop)) == 3  # nothing half-saved

    # Taking tables off waits for another DBA or Sysadmin: their empty or shrunk tables would
    # pass the restore test unnoticed, as a higher shrink threshold would let them.
    response = client.post(url, {"database": database.pk, field: "customers, events"})
    assert response.status_code == 200 and "Give the reason for the change" in response.content.decode()
    reason = f"db{database.pk}-reason"
    response = client.post(url, {"database": database.pk, field: "customers, events", reason: "archived"})
    assert response.status_code == 302
    assert critical(shop) == ["public.customers", "public.events", 'sales."Order.Items"', "public.measurements"]
    change = ChangeRequest.objects.get(kind="fewer_critical")
    assert change.changes_text == """critical tables taken off: [] -> ['sales."Order.Items"', 'public.measurements']"""
    with pytest.raises(PermissionDenied):
        change.approve(alice)
    # A table added meanwhile stays: the approval takes off what the request named, nothing else.
    client.post(
        url, {"database": database.pk, field: 'customers, events, sales."Order.Items", measurements, events_archived'}
    )
    change.approve(make_user("bob", "DBA"))
    assert critical(shop) == ["public.customers", "public.events", "public.events_archived"]
    assert JournalEntry.objects.filter(action="critical_tables_changed").latest("pk").actor == "alice (approved by bob)"
    client.post(url, {"database": database.pk, field: "", reason: "none are critical now"})
    ChangeRequest.objects.pending().get(kind="fewer_critical").approve(User.objects.get(username="bob"))
    assert critical(shop) == []
    # A database the server does not back up has no critical tables to choose.
    assert client.post(url, {"database": 999999, field: "customers"}).status_code == 404


def test_only_dbas_choose_critical_tables_on_the_server_page(client, charlie, sam, shop):
    url = reverse("critical-tables-edit", args=["shop"])
    database = Database.of_dsn(shop)
    for user in (charlie, sam):
        client.force_login(user)
        assert client.post(url, {"database": database.pk, f"db{database.pk}-tables": "customers"}).status_code == 403
        page = client.get(reverse("server", args=["shop"])).content.decode()
        assert 'action="/servers/shop/critical-tables/"' not in page
    assert critical(shop) == []
    assert not JournalEntry.objects.filter(action="critical_tables_changed").exists()


def test_each_database_has_its_own_critical_tables_held_by_its_restore_test(
    client, alice, shop, pg_cluster, passphrase_file, backup_root
):
    shop.protect_databases = "shop,ledger"
    shop.save()
    pg_cluster.create_database("ledger")
    pg_cluster.execute("CREATE TABLE entries AS SELECT g AS id FROM generate_series(1, 10) g", dbname="ledger")
    from backups.databases import discover

    discover(shop)
    ledger = Database.objects.get(server=shop, name="ledger")
    client.force_login(alice)
    url = reverse("critical-tables-edit", args=["shop"])
    field = f"db{ledger.pk}-tables"
    refused = client.post(url, {"database": ledger.pk, field: "customers"})  # shop's table, not ledger's
    assert "customers does not exist in database ledger" in refused.content.decode()
    assert client.post(url, {"database": ledger.pk, field: "entries"}).status_code == 302
    assert critical(shop, "ledger") == ["public.entries"] and critical(shop) == []

    call_command("backup", "shop", stdout=StringIO())
    pg_cluster.execute("DELETE FROM entries", dbname="ledger")
    call_command("backup", "shop", stdout=StringIO())
    from restores.restoretest import scheduled_restore_tests

    tests = {t.database.name: t for t in scheduled_restore_tests(shop, monthly=False)}
    assert tests["shop"].status == "passed"
    assert tests["ledger"].status == "failed" and "public.entries is empty" in tests["ledger"].error


def test_counting_goes_by_batches_and_notes_a_table_it_cannot_read(pg_cluster):
    """The restored copy is counted with errors noted per table: one unreadable table hides no other."""
    from backups import tables

    pg_cluster.create_database("many")
    pg_cluster.create_role("reader", password="reader-pass")
    with pg_cluster.connect("many") as conn:
        conn.execute(
            "DO $$ BEGIN FOR i IN 1..450 LOOP "
            "EXECUTE format('CREATE TABLE t%s AS SELECT generate_series(1, %s) AS n', i, i % 7); END LOOP; END $$"
        )
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader")
        conn.execute("REVOKE SELECT ON t300 FROM reader")
    with pg_cluster.connect("many", user="reader", password="reader-pass", autocommit=True) as conn:
        errors = {}
        counts = tables.count_all(conn, errors)
        assert errors == {"public.t300": "permission denied for table t300"}
        assert len(counts) == 449 and counts["public.t299"] == 299 % 7 and counts["public.t450"] == 450 % 7
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            tables.count_all(conn)  # as a backup does: the first error fails it


def test_counting_runs_no_row_level_security_policy_of_a_table_owners(pg_cluster):
    """A policy's function is its owner's code: counted with row security on, it would run with
    the portal's role. Off, as pg_dump has it, a role the policy does not let by cannot count."""
    from backups import tables

    pg_cluster.create_database("guarded")
    pg_cluster.create_role("reader", password="reader-pass")
    pg_cluster.create_role("bypasser", password="bypasser-pass")
    with pg_cluster.connect("guarded") as conn:
        conn.execute(
            "CREATE FUNCTION public.spy() RETURNS boolean LANGUAGE plpgsql AS"
            " $$BEGIN RAISE EXCEPTION 'the policy ran as %', current_user; END$$;"
            " CREATE TABLE secrets(x int); INSERT INTO secrets VALUES (1), (2);"
            " ALTER TABLE secrets ENABLE ROW LEVEL SECURITY; CREATE POLICY peek ON secrets USING (public.spy());"
            " GRANT SELECT ON secrets TO reader, bypasser; ALTER ROLE bypasser BYPASSRLS"
        )
    with pg_cluster.connect("guarded", user="reader", password="reader-pass", autocommit=True) as conn:
        errors = {}
        assert tables.count_all(conn, errors) == {}
        assert errors == {"public.secrets": 'query would be affected by row-level security policy for table "secrets"'}
    with pg_cluster.connect("guarded", user="bypasser", password="bypasser-pass", autocommit=True) as conn:
        assert tables.count_all(conn) == {"public.secrets": 2}


def test_critical_tables_named_the_old_way_are_the_same_tables(client, alice, shop):
    """Older versions recorded `customers` for public.customers: saving the list again, or adding
    one, takes nothing off."""
    client.force_login(alice)
    database = Database.of_dsn(shop)
    database.critical_tables = ["customers"]
    database.save(update_fields=["critical_tables"])
    field = f"db{database.pk}-tables"
    url = reverse("critical-tables-edit", args=["shop"])
    assert client.post(url, {"database": database.pk, field: "customers, events"}).status_code == 302
    assert critical(shop) == ["public.customers", "public.events"]
    assert not ChangeRequest.objects.exists()
