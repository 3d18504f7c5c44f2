"""A critical table emptied or shrunk past the server's threshold is said when the backup is
taken, by an alert, not only by the next weekly restore test. Found by review: a backup taken
after half of a critical table was deleted was green everywhere but the coverage page."""

from backupportal.models import JournalEntry
from backups.models import BackupRun, Database
from tests.helpers import ours, run_command
from watching.models import Alert
from watching.monitor import run_once

DB = "reliabilitymaldives"


def test_a_backup_that_finds_a_critical_table_shrunk_or_empty_alerts_and_the_next_one_resolves(
    server, sample_cluster, passphrase_file, backup_root, smtp_server
):
    Database.of_dsn(server)
    Database.objects.filter(server=server, name=DB).update(critical_tables=["public.audit_logs", "public.roles"])
    assert run_command("backup", "maldives")["status"] == "succeeded"
    run_once()
    assert not ours().filter(condition="data_shrank").exists()

    (before,) = sample_cluster.execute("SELECT count(*) FROM audit_logs", dbname=DB)[0]
    sample_cluster.execute("DELETE FROM audit_logs WHERE id % 2 = 0", dbname=DB)
    result = run_command("backup", "maldives")
    assert result["status"] == "succeeded"  # a faithful backup of what production holds now
    shrank = BackupRun.objects.get(pk=result["id"]).details["shrank"]
    assert len(shrank) == 1 and shrank[0].startswith("public.audit_logs: ") and "down 5" in shrank[0]
    run_once()
    alert = Alert.objects.get(condition="data_shrank", state="open")
    assert f"backup #{result['id']} of maldives: public.audit_logs: " in alert.message
    assert f"from {before} in backup #" in alert.message
    assert JournalEntry.objects.filter(action="alert_opened", details__condition="data_shrank").exists()

    assert run_command("backup", "maldives")["status"] == "succeeded"  # held to the shrunk one now
    run_once()
    alert.refresh_from_db()
    assert alert.state == "resolved"

    sample_cluster.execute("DELETE FROM audit_logs", dbname=DB)  # empty: alerts while it stays so
    result = run_command("backup", "maldives")
    assert BackupRun.objects.get(pk=result["id"]).details["shrank"] == ["public.audit_logs: empty"]
    run_once()
    assert Alert.objects.filter(condition="data_shrank", state="open").exists()
