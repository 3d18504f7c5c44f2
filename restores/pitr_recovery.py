"""The restored cluster's recovery: its settings (recovery.signal and postgresql.auto.conf, the
PostgreSQL 12+ way), pg_ctl as the database OS user, waiting until it promotes, and where
recovery stopped, asked of the cluster and judged by pitr_verdict. Split from restores/pitr.py.
"""

import os
import re
import time

from django.conf import settings
from django.utils import timezone

from backupportal.lib.libpq import SAFE_AUTH
from backupportal.lib.osuser import chown_to_db_user
from backups import binaries, walspool
from backups.binaries import backup_major
from restores import pitr_verdict
from restores.models import RestoreRun
from restores.pitr_plan import RestoreFailed
from restores.pitr_prefetch import restore_command


def heartbeat(run):
    RestoreRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now())


def recovery_settings(plan):
    settings_ = {
        # Waits for the prefetcher's copy of each file (restores/restore_wal.py).
        "restore_command": restore_command(plan.staging),
        "recovery_target_timeline": "latest",
        # The restored cluster's new timeline must never reach the production archive.
        "archive_mode": "off",
        "port": str(plan.port),
        "listen_addresses": "localhost",
        # A production with synchronous standbys would hang every commit of the copy.
        "synchronous_standby_names": "",
        # tar wrote without fsync, so recovery first syncs the data directory: one syncfs()
        # instead of an fsync per file (seconds even for a small cluster).
        "recovery_init_sync_method": "syncfs",
        # Whether recovery reached its target is read from its log (pitr_verdict): in one known
        # file, in the words the verdict looks for, whatever production's logging settings are.
        "logging_collector": "off",
        "log_destination": "stderr",
        "lc_messages": "C",
    }
    target = plan.target
    if target.kind == "time":
        settings_["recovery_target_time"] = target.value.isoformat(sep=" ")
    elif target.kind == "lsn":
        settings_["recovery_target_lsn"] = target.value
    elif target.kind == "name":
        settings_["recovery_target_name"] = target.value
    # Without a target, recovery replays all the WAL and promotes by itself.
    settings_["recovery_target_action"] = "promote"
    return settings_


def write_recovery_settings(plan):
    """recovery.signal and postgresql.auto.conf: recovery.conf no longer exists (PostgreSQL 12+)."""
    if not (plan.datadir / "postgresql.conf").exists():
        # Debian keeps it in /etc: a copy of the data directory has none.
        (plan.datadir / "postgresql.conf").write_text("# written by backupportal's PITR restore\n")
        plan.notes.append(
            "the backup had no postgresql.conf (kept outside the data directory): an empty one was written"
        )
    if not (plan.datadir / "pg_hba.conf").exists():
        (plan.datadir / "pg_hba.conf").write_text(
            "local all all peer\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n"
        )
        plan.notes.append("the backup had no pg_hba.conf: one allowing local connections was written")
    lines = [f"\n# PITR restore by backupportal, {timezone.localtime():%Y-%m-%d %H:%M:%S%z}, target {plan.target.text}"]
    lines += [f"{name} = {walspool.conf_quote(value)}" for name, value in recovery_settings(plan).items()]
    with open(plan.datadir / "postgresql.auto.conf", "a") as conf:
        conf.write("\n".join(lines) + "\n")
    (plan.datadir / "recovery.signal").touch()
    (plan.datadir / "log").mkdir(exist_ok=True)
    # One by one: a chown -R of the data directory would race the WAL prefetcher's renames.
    for name in ("postgresql.conf", "pg_hba.conf", "postgresql.auto.conf", "recovery.signal", "log"):
        chown_to_db_user(plan.datadir / name)


def pg_ctl(plan, *args):
    """binaries.pg_ctl on the restored cluster (of the backup's version until it has a PG_VERSION)."""
    return binaries.pg_ctl(plan.datadir, *args, major=backup_major(plan.base))


def start_and_wait(plan, run, watch=lambda: None):
    """Start the cluster and wait until it promotes; `watch()` raises what went wrong meanwhile
    (the WAL prefetcher's failure), which is then the restore's error."""
    logfile = plan.datadir / "log" / "pitr-restore.log"
    proc = pg_ctl(plan, "start", "-W", "-l", str(logfile))
    if proc.returncode != 0:
        raise RestoreFailed(f"pg_ctl could not start the restored cluster: {(proc.stderr or proc.stdout).strip()}")
    deadline = time.monotonic() + settings.BACKUP_TIMEOUT
    started = beat = time.monotonic()
    # PostgreSQL removes recovery.signal when recovery reached its target and it promotes:
    # looked at often (a short recovery is over in a second), the run's heartbeat written seldom.
    while (plan.datadir / "recovery.signal").exists():
        watch()
        if not postmaster_alive(plan) and time.monotonic() - started > 2:
            watch()  # a fetch failure stopped recovery: that is what to report
            raise RestoreFailed(startup_failure(plan, logfile))
        if time.monotonic() > deadline:
            raise RestoreFailed(f"recovery did not finish within {settings.BACKUP_TIMEOUT} s: see {logfile}")
        if time.monotonic() - beat > 2:
            heartbeat(run)
            beat = time.monotonic()
        time.sleep(0.05)
    plan.recovered = recovered_position(plan, logfile)
    pitr_verdict.judge(plan, logfile)


def postmaster_alive(plan):
    try:
        pid = int((plan.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (ValueError, OSError):
        return False
    return True


def recovered_position(plan, logfile, wait=30):
    """Where recovery stopped: asked of the promoted cluster, else read from its log."""
    import psycopg

    server = plan.server
    host = server.host if server.host.startswith("/") else "127.0.0.1"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and postmaster_alive(plan):
        try:
            with psycopg.connect(
                host=host,
                port=plan.port,
                user=server.user,
                password=server.password or None,
                require_auth=SAFE_AUTH,  # never the password in clear text, to whatever holds the port
                dbname=server.dbname,
                connect_timeout=3,
                autocommit=True,
            ) as conn:
                in_recovery, replayed_at, lsn, walfile = conn.execute(
                    "SELECT pg_is_in_recovery(), pg_last_xact_replay_timestamp(), pg_last_wal_replay_lsn(), "
                    "CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END"
                ).fetchone()
        except psycopg.OperationalError as e:
            if "authentication" in str(e) or "pg_hba.conf" in str(e):
                break  # the restored cluster lets us in no more than production's rules say
            time.sleep(0.3)
            continue
        if in_recovery:  # promoting: recovery.signal is gone, the end-of-recovery checkpoint is not
            time.sleep(0.05)
            continue
        return {
            "recovered_to": timezone.localtime(replayed_at).isoformat(sep=" ") if replayed_at else f"LSN {lsn}",
            "recovered_lsn": str(lsn or ""),
            "timeline": int(walfile[:8], 16),
        }
    return {"recovered_to": logged_position(logfile)}


def logged_position(logfile):
    text = logfile.read_text(errors="replace") if logfile.exists() else ""
    m = re.findall(r"last completed transaction was at log time (.+)$", text, re.M)
    return m[-1].strip() if m else f"see {logfile}"


def startup_failure(plan, logfile):
    text = logfile.read_text(errors="replace") if logfile.exists() else ""
    fatal = [line for line in text.splitlines() if "FATAL:" in line or "PANIC:" in line]
    if any("recovery ended before configured recovery target was reached" in line for line in fatal):
        return pitr_verdict.shortfall(plan, text)  # the log goes with the directory: the line says it all
    if fatal:
        return (
            f"the restored cluster stopped: {fatal[-1].split('FATAL:')[-1].split('PANIC:')[-1].strip()} (see {logfile})"
        )
    return f"the restored cluster stopped during recovery: see {logfile}"
