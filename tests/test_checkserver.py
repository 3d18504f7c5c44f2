"""checkserver against real clusters: each check with a verdict and what to do."""

import pytest

from backups import walhealth, walspool
from tests.helpers import enable_push, run_command

pytest_plugins = ["tests.walfixtures"]


def verdicts(result):
    return {c["check"]: c["verdict"] for c in result["checks"]}


def test_a_server_without_archiving_is_ready_for_logical_backups_only(server, passphrase_file, backup_root, wal_spool):
    result = run_command("checkserver", "maldives")
    assert result["_exit"] == 0 and result["ready"], result
    got = verdicts(result)
    assert got["connection"] == got["version"] == got["wal_level"] == got["max_wal_senders"] == "ok"
    assert got["archiving"] == "warn" and got["encryption"] == "ok"
    assert got["free space of primary"] == "ok" and got["wal_segment_size"] == "ok"
    server.refresh_from_db()
    assert server.wal_segment_size == 1024 * 1024


@pytest.mark.parametrize("pg_major", [15, 18])  # on 18 too: tests/test_pg18.py
def test_push_archiving_set_up_by_hand_is_checked_against_what_archivecommand_prints(
    server, sample_cluster, passphrase_file, backup_root, wal_spool
):
    run_command("archivecommand", "maldives")
    result = run_command("checkserver", "maldives")
    assert result["_exit"] == 1 and not result["ready"]
    got = verdicts(result)
    assert got["archive_mode"] == "fail" and got["archive_command"] == "fail"
    todo = next(c["todo"] for c in result["checks"] if c["check"] == "archive_mode")
    assert "archive_mode = on" in todo
    assert "not ready: archive_mode, archive_command failed" in result["_stderr"]

    enable_push(sample_cluster)
    result = run_command("checkserver", "maldives")
    assert result["ready"], [c for c in result["checks"] if c["verdict"] != "ok"]
    assert verdicts(result)["archiving failures"] == "ok" and verdicts(result)["archive_timeout"] == "ok"

    # The earlier form (every segment through Python) still archives: a warning, not a failure.
    earlier = walspool.archive_command(server).split(" || ", 1)[1].removesuffix("; }")
    assert walspool.is_portal_command(server, earlier)
    sample_cluster.execute(f"ALTER SYSTEM SET archive_command = '{earlier}'")
    sample_cluster.execute("SELECT pg_reload_conf()")
    result = run_command("checkserver", "maldives")
    command = next(c for c in result["checks"] if c["check"] == "archive_command")
    assert result["ready"] and command["verdict"] == "warn" and "earlier form" in command["detail"], command
    assert walhealth.push_problems(server) == []  # the monitor raises no "wrong archive settings"


def test_an_unreachable_server_fails_the_connection_check_with_what_to_do(server, sample_cluster, passphrase_file):
    sample_cluster.stop()
    result = run_command("checkserver", "maldives")
    assert result["_exit"] == 1
    connection = result["checks"][0]
    assert connection["verdict"] == "fail" and "connection refused" in connection["detail"]


def test_an_unknown_server_is_refused(db):
    result = run_command("checkserver", "nosuch")
    assert result["_exit"] == 1 and "unknown server 'nosuch'" in result["_stderr"]
