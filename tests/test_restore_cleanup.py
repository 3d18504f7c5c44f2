"""What a restored database brings that would stop it being dropped, or reach production.

A subscription comes back from pg_restore disabled but still naming the production
subscriber's replication slot: DROP DATABASE refuses a database with a subscription, and a
DBA's DROP SUBSCRIPTION in the copy would drop production's slot on the publisher. A database
marked IS_TEMPLATE gets the flag again, and DROP DATABASE refuses a template. Every path that
drops a restored copy (a failed restore, a restore test, a failed replacement) must still drop
it, or say in one line what is left behind; the run always finishes.
"""

import subprocess
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone
from psycopg import sql

from backupportal.lib.osuser import free_port
from backups.models import BackupRun, Server
from restores import replace as replace_module
from restores.models import RestoreRequest, RestoreTest
from restores.restoretest import run_restore_test
from restores.targetdb import RestoreFailed, drop_database
from tests.helpers import register, restore_json, run_command


def backup(name):
    call_command("backup", name, stdout=StringIO())
    return BackupRun.objects.filter(server__name=name, status="succeeded").latest("created_at")


def subscriptions_in(cluster, dbname):
    return cluster.execute(
        "SELECT s.subname, s.subslotname, s.subenabled FROM pg_subscription s"
        " JOIN pg_database d ON d.oid = s.subdbid WHERE d.datname = %s ORDER BY 1",
        [dbname],
    )


def databases(cluster):
    return {name for (name,) in cluster.execute("SELECT datname FROM pg_database")}


def replace(run, alice, bob):
    """Alice asks to replace production from `run`, Bob approves, the command line runs it."""
    production = run.database_name
    request = RestoreRequest.objects.create(
        server=run.server,
        backup_run=run,
        destination="replace",
        target_database=production,
        reason="a bad import",
        requested_by=alice,
    )
    request.approve(bob, confirm_database=production)
    return restore_json(str(run.pk), "--replace", "--request", str(request.pk))


@pytest.fixture
def subscriber(pg_cluster, db):
    """Database `orders` subscribes to publication `feed` of database `hub`, through slot s1
    (not connected: the slot need not exist for the test, as on a subscriber whose publisher
    is another host)."""
    pg_cluster.execute("CREATE DATABASE hub")
    pg_cluster.execute("CREATE TABLE items (id int PRIMARY KEY, name text)", dbname="hub")
    pg_cluster.execute("CREATE PUBLICATION feed FOR TABLE items", dbname="hub")
    pg_cluster.execute("CREATE DATABASE orders")
    pg_cluster.execute("CREATE TABLE items (id int PRIMARY KEY, name text)", dbname="orders")
    pg_cluster.execute("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 50) g", dbname="orders")
    pg_cluster.execute(
        sql.SQL(
            "CREATE SUBSCRIPTION orders_feed CONNECTION {} PUBLICATION feed"
            " WITH (connect = false, slot_name = 's1', enabled = false)"
        ).format(sql.Literal(f"host={pg_cluster.host} port={pg_cluster.port} dbname=hub user=postgres")),
        dbname="orders",
    )
    return register(pg_cluster, "orders", "orders")


def test_a_restored_subscription_is_detached_from_production_s_slot_and_named(
    subscriber, pg_cluster, passphrase_file, backup_root
):
    run = backup("orders")
    result = restore_json(str(run.pk), "--into-database", "orders_copy")
    assert result["status"] == "succeeded with warnings", result
    assert subscriptions_in(pg_cluster, "orders_copy") == [("orders_feed", None, False)]
    assert subscriptions_in(pg_cluster, "orders") == [("orders_feed", "s1", False)]  # production's, untouched
    [warning] = result["warnings"]
    assert 'subscription "orders_feed" in orders_copy was disabled and detached from slot s1' in warning
    assert "the slot on the publisher was not touched" in warning
    assert (
        """ALTER SUBSCRIPTION "orders_feed" SET (slot_name = 'NEW_SLOT'); ALTER SUBSCRIPTION "orders_feed" ENABLE"""
        in warning
    )

    drop_database(subscriber, "orders_copy")
    assert "orders_copy" not in databases(pg_cluster)


def test_a_leftover_subscription_still_naming_a_slot_is_detached_before_the_drop(subscriber, pg_cluster):
    # As an older portal's restore, or a pg_restore by hand, leaves it. Were its slot dropped on
    # the publisher (a plain DROP SUBSCRIPTION), this one would fail: there is no publisher at s1.
    pg_cluster.execute("CREATE DATABASE orders_by_hand")
    pg_cluster.execute(
        "CREATE SUBSCRIPTION orders_feed_2 CONNECTION 'host=127.0.0.1 port=1 dbname=hub' PUBLICATION feed"
        " WITH (connect = false, slot_name = 's1')",
        dbname="orders_by_hand",
    )
    pg_cluster.execute("ALTER DATABASE orders_by_hand IS_TEMPLATE true")
    drop_database(subscriber, "orders_by_hand")
    assert "orders_by_hand" not in databases(pg_cluster)
    assert subscriptions_in(pg_cluster, "orders") == [("orders_feed", "s1", False)]


def test_a_restore_test_of_a_subscriber_passes_and_leaves_nothing_behind(
    subscriber, pg_cluster, passphrase_file, backup_root
):
    backup("orders")
    before = databases(pg_cluster)
    test = run_restore_test(subscriber, database=subscriber.databases.get(name="orders"))
    assert test.status == RestoreTest.Status.PASSED, test.error
    assert databases(pg_cluster) == before
    assert 'subscription "orders_feed"' in " ".join(test.restores.get().warnings)
    # and on the test's own page, with the restore's check
    assert 'warning: subscription "orders_feed" in restoretest_' in test.checks[0]["detail"]


def test_a_restore_test_of_a_template_database_passes_and_leaves_nothing_behind(
    pg_cluster, db, passphrase_file, backup_root, tmp_path
):
    # The portal backs up no template; a stock pg_dump of one, imported, brings IS_TEMPLATE.
    pg_cluster.execute("CREATE DATABASE stencil")
    pg_cluster.execute("CREATE TABLE shapes AS SELECT generate_series(1, 20) AS id", dbname="stencil")
    pg_cluster.execute("ALTER DATABASE stencil IS_TEMPLATE true")
    server = register(pg_cluster, "stencil", "stencil")
    env = {"PGHOST": pg_cluster.host, "PGPORT": str(pg_cluster.port), "PGUSER": "postgres", "PATH": "/usr/bin:/bin"}
    dump = tmp_path / "stencil.dump"
    subprocess.run([str(Path(pg_cluster.bin_dir) / "pg_dump"), "-Fc", "-f", dump, "stencil"], env=env, check=True)
    imported = run_command("importbackup", str(dump), "--server", "stencil", "--database", "stencil")
    assert imported["_exit"] == 0, imported["_stderr"]
    before = databases(pg_cluster)
    test = run_restore_test(server)
    assert test.status == RestoreTest.Status.PASSED, test.error
    assert databases(pg_cluster) == before


def test_a_restored_copy_that_cannot_be_dropped_fails_the_restore_test_in_one_line(
    pg_cluster, db, passphrase_file, backup_root, monkeypatch
):
    # A prepared transaction holds the copy: DROP DATABASE ... WITH (FORCE) refuses it.
    pg_cluster.execute("ALTER SYSTEM SET max_prepared_transactions = 2")
    pg_cluster.restart()
    pg_cluster.execute("CREATE DATABASE ledger")
    pg_cluster.execute("CREATE TABLE entries AS SELECT generate_series(1, 20) AS id", dbname="ledger")
    server = register(pg_cluster, "ledger", "ledger")
    backup("ledger")
    from restores import restoretest

    checked = restoretest.run_checks

    def checks_then_hold(run, target, dbname):
        with pg_cluster.connect(dbname, autocommit=False) as conn:
            conn.execute("CREATE TABLE held (id int)")
            conn.execute("PREPARE TRANSACTION 'held'")
        return checked(run, target, dbname)

    monkeypatch.setattr(restoretest, "run_checks", checks_then_hold)
    test = run_restore_test(server, database=server.databases.get(name="ledger"))
    assert test.status == RestoreTest.Status.FAILED
    [left] = [c for c in test.checks if not c["ok"]]
    assert left["name"] == "clean up" and "\n" not in left["detail"]
    [copy] = [name for name in databases(pg_cluster) if name.startswith("restoretest_")]
    assert copy in left["detail"] and "prepared transactions" in left["detail"]
    pg_cluster.execute("ROLLBACK PREPARED 'held'", dbname=copy)
    drop_database(server, copy)


def test_production_with_a_name_of_any_characters_can_be_replaced(
    pg_cluster, db, alice, bob, passphrase_file, backup_root
):
    pg_cluster.execute('CREATE DATABASE "Sales-Ä"')
    pg_cluster.execute("CREATE TABLE orders AS SELECT generate_series(1, 30) AS id", dbname="Sales-Ä")
    register(pg_cluster, "sales", "Sales-Ä")
    run = backup("sales")
    pg_cluster.execute("INSERT INTO orders SELECT generate_series(31, 40)", dbname="Sales-Ä")  # lost by the restore
    result = replace(run, alice, bob)
    assert result["status"] == "succeeded", result
    assert pg_cluster.execute("SELECT count(*) FROM orders", dbname="Sales-Ä") == [(30,)]
    stamp = f"{timezone.localtime():%Y%m%d}"
    [kept] = [name for name in databases(pg_cluster) if name.startswith(f"sales_before_{stamp}")]
    pg_cluster.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(kept)))
    assert pg_cluster.execute("SELECT count(*) FROM orders", dbname=kept) == [(40,)]
    assert Server.objects.get(name="sales").dbname == "Sales-Ä"


def test_production_replaced_from_a_subscriber_s_backup_says_first_that_it_no_longer_replicates(
    subscriber, pg_cluster, alice, bob, passphrase_file, backup_root
):
    result = replace(backup("orders"), alice, bob)
    assert result["status"] == "succeeded with warnings", result
    [warning] = result["warnings"]
    assert warning.startswith('PRODUCTION orders DOES NOT REPLICATE: its subscription "orders_feed"')
    assert (
        """in orders: ALTER SUBSCRIPTION "orders_feed" SET (slot_name = 's1'); ALTER SUBSCRIPTION "orders_feed" ENABLE"""
        in warning
    )
    assert subscriptions_in(pg_cluster, "orders") == [("orders_feed", None, False)]
    [kept] = [name for name in databases(pg_cluster) if name.startswith("orders_before_")]
    assert f"The previous database {kept} was detached from that slot at the swap" in warning
    assert subscriptions_in(pg_cluster, kept) == [("orders_feed", None, False)]  # it can be dropped safely


@pytest.fixture
def logical_cluster(pg_cluster):
    """A cluster that can hold logical replication slots and prepared transactions (a restart)."""
    pg_cluster.configure(wal_level="logical", max_prepared_transactions=5)
    pg_cluster.restart()
    return pg_cluster


def test_production_with_a_logical_replication_slot_is_not_replaced(
    logical_cluster, db, alice, bob, passphrase_file, backup_root
):
    """The slot belongs to the database: renamed away, production would keep it in the kept copy,
    closed to connections, its subscriber cut off and WAL held. Refused before the restore."""
    pg = logical_cluster
    pg.execute("CREATE DATABASE shop")
    pg.execute("CREATE TABLE orders AS SELECT generate_series(1, 30) AS id", dbname="shop")
    register(pg, "shop", "shop")
    run = backup("shop")
    pg.execute("SELECT pg_create_logical_replication_slot('downstream', 'pgoutput')", dbname="shop")
    result = replace(run, alice, bob)
    assert result["status"] == "failed", result
    assert "production shop has logical replication slots (downstream): they belong to the database" in result["error"]
    assert result["error"].endswith("production shop is unchanged") and "\n" not in result["error"]
    assert not [name for name in databases(pg) if name.startswith(("shop_restore_", "shop_before_"))]
    assert pg.execute("SELECT database FROM pg_replication_slots WHERE slot_name = 'downstream'") == [("shop",)]
    pg.execute("SELECT pg_drop_replication_slot('downstream')")


def test_a_swap_that_fails_gives_production_back_its_subscriptions(
    subscriber, logical_cluster, alice, bob, passphrase_file, backup_root
):
    """A prepared transaction holds production: the renames fail after its subscriptions let go of
    their slots for the swap. They get them back, enabled as they were, and production takes
    connections again: "unchanged" is then true."""
    pg = logical_cluster
    pg.execute("ALTER SUBSCRIPTION orders_feed ENABLE", dbname="orders")
    run = backup("orders")
    with pg.connect("orders", autocommit=False) as conn:
        conn.execute("INSERT INTO items VALUES (999, 'held')")
        conn.execute("PREPARE TRANSACTION 'held'")
    try:
        result = replace(run, alice, bob)
        assert result["status"] == "failed", result
        assert result["error"].startswith("swapping the databases failed: "), result
        assert result["error"].endswith("production orders is unchanged")
        assert subscriptions_in(pg, "orders") == [("orders_feed", "s1", True)]
        assert pg.execute("SELECT datallowconn FROM pg_database WHERE datname = 'orders'") == [(True,)]
        assert not [name for name in databases(pg) if name.startswith(("orders_restore_", "orders_before_"))]
    finally:
        pg.execute("ROLLBACK PREPARED 'held'", dbname="orders")
        pg.execute("ALTER SUBSCRIPTION orders_feed DISABLE", dbname="orders")


def test_what_a_failed_swap_could_not_undo_is_said_never_unchanged(db):
    """The cluster went away mid-swap: production left closed, or its subscriptions detached, is
    said in capitals with what to run; the run then never adds "production ... is unchanged"."""
    gone = Server(name="gone", dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/orders")
    failure = RestoreFailed("swapping the databases failed: the connection was lost")
    replace_module._reopen(gone, "orders", failure)
    replace_module._reattach(gone, "orders", [("orders_feed", "s1", True)], failure)
    said = str(failure)
    assert failure.production_changed and "\n" not in said
    assert said.startswith("swapping the databases failed: the connection was lost; PRODUCTION orders MAY TAKE NO")
    assert 'run ALTER DATABASE "orders" ALLOW_CONNECTIONS true' in said
    assert """PRODUCTION orders DOES NOT REPLICATE: its subscriptions were detached""" in said
    assert (
        """ALTER SUBSCRIPTION "orders_feed" SET (slot_name = 's1'); ALTER SUBSCRIPTION "orders_feed" ENABLE;""" in said
    )
