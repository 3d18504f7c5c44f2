"""A PITR from a base backup that lacks a database's directory fails, naming the database.

Such backups exist: before the portal failed a base backup on the server's "skipping special
file" WARNING, a database moved to another disk by hand (base/OID a symbolic link) was left out
of it, of its manifest and of pg_verifybackup's view, and a PITR from it said "succeeded" while
the database could not be entered ("database does not exist")."""

from backupportal.lib.osuser import free_port
from backups import basestream
from tests.helpers import database_moved_away, enable_push, pitr, run_command

pytest_plugins = ["tests.walfixtures"]


def test_a_pitr_from_an_old_base_backup_without_a_databases_directory_fails_naming_it(
    server, sample_cluster, passphrase_file, backup_root, wal_spool, restored, settings, monkeypatch
):
    settings.BASE_COMPRESSION = "server"
    cluster = sample_cluster
    enable_push(cluster)
    with database_moved_away(cluster) as oid:
        # The backup as the portal took it before it listened to the server's warnings: the
        # server really skips the directory; only the portal's check of what it said is left out.
        monkeypatch.setattr(basestream, "skipped_files", lambda warnings: "")
        base = run_command("backup", "maldives", "--kind", "base")
        assert base["status"] == "succeeded", base
        monkeypatch.undo()
        result = pitr(restored(), free_port(), "--target", "latest")
    assert result["status"] == "failed", result
    assert (
        f"database moved is missing from the restored cluster (its directory is not in the restored data directory):"
        f" base backup #{base['id']} left out its directory base/{oid}, which was a symbolic link on the source"
        in result["error"]
    )
    assert "take a new base backup and restore from that" in result["error"]
