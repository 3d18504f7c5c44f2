"""The benchmark times each method on a settled machine, or not at all (bench/compare.py)."""

from bench import compare
from tests.helpers import wait_for


def test_a_method_is_timed_once_the_wal_before_it_is_archived_and_fails_untimed_if_it_never_is(pg_cluster, monkeypatch):
    pg_cluster.configure(archive_mode="on", archive_command="false", wal_level="replica")
    pg_cluster.restart()
    pg_cluster.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    pg_cluster.execute("SELECT pg_switch_wal()")
    wait_for(lambda: compare.ready_count(pg_cluster) > 0)
    monkeypatch.setattr(compare, "ARCHIVING", [pg_cluster])
    monkeypatch.setattr(compare, "SETTLE_SECONDS", 2)
    ran, rows = [], compare.Rows()

    compare.attempt(rows, "stuck archiver", ran.append, "timed")
    assert ran == []  # never started on a busy machine
    [row] = rows.list()
    assert (
        row["times"] == [] and "archiver still had" in row["note"] and "not timed on a settled machine" in row["note"]
    )

    pg_cluster.execute("ALTER SYSTEM SET archive_command = 'true'")
    pg_cluster.execute("SELECT pg_reload_conf()")
    monkeypatch.setattr(compare, "SETTLE_SECONDS", 60)
    compare.attempt(rows, "archiver caught up", ran.append, "timed")
    assert ran == ["timed"] and compare.ready_count(pg_cluster) == 0
