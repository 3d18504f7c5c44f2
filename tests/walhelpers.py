"""Helpers for the WAL and PITR tests: push or pull archiving on real throwaway clusters."""

import json
import shutil
import tempfile
import time
from io import StringIO
from pathlib import Path

from django.core.management import CommandError, call_command
from django.urls import reverse


def run_command(*args):
    """A management command's --json result (exit status included), whatever it exits with."""
    out, err = StringIO(), StringIO()
    code = 0
    try:
        call_command(*args, "--json", stdout=out, stderr=err)
    except SystemExit as e:
        code = e.code
    except CommandError as e:  # what manage.py prints as one line on stderr, exiting 1
        code = 1
        err.write(str(e))
    lines = out.getvalue().strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    result["_exit"], result["_stderr"] = code, err.getvalue()
    return result


def enable_push(cluster, name="maldives"):
    """What a DBA does: run archivecommand, paste its lines into postgresql.conf, restart."""
    out = StringIO()
    call_command("archivecommand", name, stdout=out)
    lines = [line for line in out.getvalue().splitlines() if line and not line.startswith("#")]
    with open(cluster.datadir / "postgresql.conf", "a") as conf:
        conf.write("\n# pasted from manage.py archivecommand\n" + "\n".join(lines) + "\n")
    cluster.restart()
    return lines


def switch_wal(cluster):
    """Force a segment switch; returns the name of the segment just completed."""
    return cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]


def wait_for(predicate, timeout=20, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_archived(cluster, name, timeout=20):
    """Until PostgreSQL's archiver reports `name` (or a later one) archived."""

    def done():
        row = cluster.execute("SELECT last_archived_wal FROM pg_stat_archiver")[0][0]
        return row is not None and row[:24] >= name

    wait_for(done, timeout, f"{name} to be archived")


def restore_dir():
    """An empty directory for a restored cluster, somewhere the postgres user can reach."""
    parent = Path(tempfile.mkdtemp(prefix="bp-restore-"))
    parent.chmod(0o755)
    return parent / "data"


def stop_restored(datadir):
    """Stop a cluster a restore left running, and remove it."""
    from backupportal.lib.pgcluster import stop_left_running

    stop_left_running(datadir)
    shutil.rmtree(Path(datadir).parent, ignore_errors=True)


def rows(port, query, dbname="reliabilitymaldives"):
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=dbname, autocommit=True) as conn:
        return conn.execute(query).fetchall()


# --- Sandbox clusters of restore requests. ---


def ask_sandbox(client, user, server, target_time="", run=None):
    client.force_login(user)
    return client.post(
        reverse("restore-request-new"),
        {
            "server": server.pk,
            "backup_run": run.pk if run else "",
            "target_time": target_time,
            "destination": "sandbox_cluster",
            "reason": "what did the table look like before the bad deploy?",
        },
    )


def base_backup():
    from backups.models import BackupRun

    result = run_command("backup", "maldives", "--kind", "base")
    assert result["status"] == "succeeded", result
    return BackupRun.objects.get(pk=result["id"])


def postgres_running_in(root):
    """Postmasters whose data directory is under root."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"postgres") and any(str(root).encode() in a for a in argv):
            found.append(int(entry.name))
    return found
