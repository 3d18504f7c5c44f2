"""Pull archiving: pg_receivewal supervised beside the worker (`manage.py receivewal NAME`).

pg_receivewal streams from a replication slot, so the server keeps the WAL while the
receiver is down, and writes into the server's spool; completed segments are ingested like
pushed ones. It is restarted whenever it dies (with a growing pause while it keeps dying);
after a few failures in a row (journaled) the monitor is told to look, finds the slot idle and
opens receiver_down; it resolves once the stream has held for a while. It dies with the supervisor (no orphan streaming on).
A slot the server invalidated is never streamed from: no restart mends it, and a DBA is told to drop it.
"""

import signal
import subprocess
import time

import psycopg
from django.conf import settings

from backupportal import conditions, journal
from backupportal.lib.pgerrors import explain
from backups import walingest, walnames, walspool
from backups.binaries import client_tool
from backups.crypto import die_with_parent
from backups.pipeline import BackupFailed, Tool

RESTART_PAUSES = [1, 2, 5, 10, 30]
ALERT_AFTER_FAILURES = 3
INGEST_EVERY = 1.0


def steady(streaming_seconds):
    """A stream that has held this long counts as recovered: receiver_down may resolve.

    The one rule for the supervisor, which times its own child, and for the monitor, which asks
    the server how long the slot's walsender has been connected (backups.walhealth.receiver_problem).
    """
    return streaming_seconds >= settings.RECEIVER_STEADY_SECONDS


# A slot's row as JSON (its columns differ by version: invalidation_reason from 17).
SLOT_ROW = (
    "SELECT s.active, extract(epoch FROM now() - a.backend_start)::float8, to_jsonb(s) "
    "FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = %s"
)


def slot_invalidated(server, columns):
    """(what is wrong, what to do) when the server invalidated the slot (max_slot_wal_keep_size,
    18's idle_replication_slot_timeout), else None. Restarting pg_receivewal never mends it."""
    if (columns or {}).get("wal_status") != "lost" and not (columns or {}).get("invalidation_reason"):
        return None
    why = columns.get("invalidation_reason") or "wal_status lost"
    slot = server.replication_slot
    return (
        f"replication slot {slot} was invalidated by the server ({why}): it keeps no WAL and nothing can stream from it",
        f"drop it (SELECT pg_drop_replication_slot('{slot}')): `manage.py receivewal {server.name}` makes it again "
        "and goes on from there, setting aside the segment it was receiving; the WAL in between is not in the "
        "archive: take a base backup",
    )


class SlotInvalidated(BackupFailed):
    """The slot was invalidated before pg_receivewal was started on it (Receiver.refuse_invalidated_slot)."""


class Receiver:
    def __init__(self, server, log=print, poll=0.2):
        self.server, self.log, self.poll = server, log, poll
        self.directory = walspool.prepare_pull_spool(server)
        self.child = None
        self.started_at = None
        self.failures = 0
        self.restarts = 0
        self.made_slot = False

    def argv(self, *extra):
        return [str(client_tool(self.server, "pg_receivewal")), "--slot", self.server.replication_slot, *extra]

    def create_slot(self):
        """The slot, created once: from then on the server keeps WAL for us. Remembers whether
        this start made it (a slot that existed may have been invalidated; one just made was not)."""
        try:
            self.made_slot = self.slot_row() is None
        except psycopg.Error:
            # A role that may replicate but not connect to the database, a server at max_connections
            # (walsenders have slots of their own): pg_receivewal may still start; "lost" then
            # reads as the server's invalidation, as before this was told.
            self.made_slot = False
        proc = subprocess.run(
            self.argv("--create-slot", "--if-not-exists", "--no-password"),
            env=Tool([], self.server.libpq_env()).full_env(),
            preexec_fn=die_with_parent,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            raise BackupFailed(
                f"cannot create replication slot {self.server.replication_slot}: {lines[-1] if lines else ''}"
            )

    def start_child(self):
        self.create_slot()
        self.refuse_invalidated_slot()
        self.spawn()

    def spawn(self):
        walspool.segment_size(self.server)
        self.child = Tool(
            self.argv("--directory", str(self.directory), "--no-loop", "--synchronous", "--no-password", "--verbose"),
            self.server.libpq_env(),
        ).start()
        self.started_at = time.monotonic()
        self.log(f"pg_receivewal started (pid {self.child.proc.pid}) into {self.directory}")

    def refuse_invalidated_slot(self):
        """A slot this start did not make, found invalidated: pg_receivewal is not started on it.
        With a partial segment in the spool it would ask for WAL the server removed and die; with
        none it asks the slot where to begin, finds no position and begins at the server's own,
        which 15 allows on a dead physical slot: the WAL in between would be missing from the
        archive without a word (the slot then reads 'reserved' again)."""
        if not self.made_slot and (invalidated := slot_invalidated(self.server, self.slot_columns())):
            raise SlotInvalidated("; ".join(invalidated))

    def child_died(self):
        rc = self.child.proc.poll()
        error = self.child.error_line(self.server)
        # A slot the server invalidated: no restart mends it; say so, and alert now.
        slot = self.slot_columns()
        # A slot this start made, whose pg_receivewal died before it was seen streaming steadily
        # (still_new), was not invalidated by the server (no slot falls max_slot_wal_keep_size
        # behind in seconds; on 17+ the server says which it was).
        asked_for_removed = bool(slot and self.made_slot and self.asked_for_removed_wal(slot))
        invalidated = slot_invalidated(self.server, slot) if slot and not asked_for_removed else None
        error = "; ".join(invalidated) if invalidated else error
        if slot and not invalidated and (aside := self.set_partial_aside(slot, error, asked_for_removed)):
            error = f"{error}; {aside}"
        self.child, self.failures, self.restarts = None, self.failures + 1, self.restarts + 1
        self.log(f"pg_receivewal exited with code {rc}: {error}")
        journal.record(
            "receiver_restarted", actor="job:receivewal", obj=self.server, outcome="failed", code=rc, error=error
        )
        if self.failures >= ALERT_AFTER_FAILURES or invalidated:
            # Journaled above; the monitor finds the slot idle and opens receiver_down.
            conditions.changed("receiver_down", server=self.server)

    def still_new(self):
        """Called while pg_receivewal runs: once it has streamed steadily, the slot this start made
        is no longer new, and "lost" from then on is the server's invalidation. Measured while it
        is seen alive, not when its death is noticed (an ingest pass may come between)."""
        if self.made_slot and steady(time.monotonic() - self.started_at):
            self.made_slot = False
        return self.made_slot

    @staticmethod
    def asked_for_removed_wal(slot):
        """A fresh slot that reads "lost" took, as its restart position, the one pg_receivewal asked
        for (the spool's, from before the slot was made), whose WAL the server had removed; or it
        reads no restart position yet, depending on which the walsender read first. 17+ name a real
        invalidation; on 15 and 16 an invalidated slot that pg_receivewal asked again reads the same."""
        return slot.get("wal_status") == "lost" and not slot.get("invalidation_reason")

    def set_partial_aside(self, slot, error, asked_for_removed=False):
        """A partial segment in the spool from before the slot's position (its slot was dropped and
        made again, as an invalidated one needs; a new primary's slot after a failover): the server
        keeps none of its WAL for the slot, and pg_receivewal, which goes on from it, would ask for it
        for ever. It is set aside (renamed .superseded, kept for a DBA) and the receiver goes on from
        the slot. '' when there is none such: the slot has what the spool goes on from."""
        size, partials = walspool.segment_size(self.server), sorted(self.directory.glob("*.partial"))
        remade = ""
        if asked_for_removed:  # its restart position is the partial's own, already removed
            behind = partials
            remade = self.drop_slot()
        elif slot.get("restart_lsn"):
            keeps_from = walnames.segno_of_lsn(slot["restart_lsn"], size)
            behind = [p for p in partials if walnames.segno_of(p.name[:24], size) < keeps_from]
        else:  # a slot made again reserves nothing until it streams: the server's own word then
            behind = partials if "has already been removed" in error else []
        for partial in behind:
            partial.rename(partial.with_name(partial.name + ".superseded"))
        if not behind:
            return remade
        return (
            f"set aside {', '.join(p.name for p in behind)} (renamed .superseded, in {self.directory}): the server "
            f"keeps its WAL no more for slot {self.server.replication_slot}, so the receiver goes on from the slot"
            f"{f' ({remade})' if remade else ''}; the WAL in between is not in the archive: take a base backup of {self.server}"
        )

    def drop_slot(self, timeout=10):
        """Drop the fresh slot once its walsender has gone (pg_receivewal has just exited): kept,
        pg_receivewal would ask it for the lost position again; it holds nothing. Says what became of it."""
        slot, deadline = self.server.replication_slot, time.monotonic() + timeout
        while True:
            try:
                with self.server.connect(connect_timeout=10) as conn:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
                return f"slot {slot}, made for it and holding nothing, was dropped to be made again"
            except psycopg.errors.UndefinedObject:
                return f"slot {slot} is gone: it is made again"
            except psycopg.errors.ObjectInUse:
                if time.monotonic() < deadline:
                    time.sleep(self.poll)
                    continue
                problem = "still in use"
            except psycopg.Error as e:
                problem = explain(e, server=self.server)
            return f"slot {slot} could not be dropped ({problem}): drop it (SELECT pg_drop_replication_slot('{slot}'))"

    def slot_row(self):
        """The slot's row (pg_replication_slots, as JSON), None when there is none; the server's
        error when it does not answer."""
        with self.server.connect(connect_timeout=10) as conn:
            row = conn.execute(SLOT_ROW, [self.server.replication_slot]).fetchone()
        return row[2] if row else None

    def slot_columns(self):
        """The slot's row, or None: gone, or the server not answering."""
        try:
            return self.slot_row()
        except psycopg.Error:
            return None

    def run(self, should_stop):
        """Supervise until should_stop() is true; then stop pg_receivewal cleanly and ingest."""
        journal.record("receiver_started", actor="job:receivewal", obj=self.server, slot=self.server.replication_slot)
        last_ingest = 0.0
        try:
            while not should_stop():
                if self.child is not None and self.child.proc.poll() is not None:
                    self.child_died()
                if self.child is None and not self._pause_then_start(should_stop):
                    continue
                self.still_new()  # pg_receivewal was alive at the poll above
                if self.failures and steady(time.monotonic() - self.started_at):
                    self.failures = 0
                    conditions.changed("receiver_down", server=self.server)  # steady again: may resolve
                if time.monotonic() - last_ingest >= INGEST_EVERY:
                    self.ingest()
                    last_ingest = time.monotonic()
                time.sleep(self.poll)
        finally:
            self.stop_child()
            self.ingest()
            journal.record("receiver_stopped", actor="job:receivewal", obj=self.server, restarts=self.restarts)

    def _pause_then_start(self, should_stop):
        if self.failures:
            pause = RESTART_PAUSES[min(self.failures, len(RESTART_PAUSES)) - 1]
            deadline = time.monotonic() + pause
            while time.monotonic() < deadline and not should_stop():
                time.sleep(self.poll)
            if should_stop():
                return False
        try:
            self.start_child()
            return True
        except SlotInvalidated as e:
            self.failures += 1
            self.log(f"pg_receivewal not started: {e}")
            journal.record("receiver_refused", actor="job:receivewal", obj=self.server, outcome="failed", error=str(e))
            conditions.changed("receiver_down", server=self.server)  # no restart mends it: alert now
            return False
        except (BackupFailed, walnames.WalError) as e:
            self.failures += 1
            self.log(f"cannot start pg_receivewal: {e}")
            if self.failures >= ALERT_AFTER_FAILURES:
                conditions.changed("receiver_down", server=self.server)
            return False

    def ingest(self):
        try:
            result = walingest.ingest(self.server, actor="job:receivewal")
        except walnames.WalError as e:
            # Received WAL stays in the directory (and on the server, thanks to the slot) until fixed;
            # ingest() left the marker and the archive_failing alert the monitor keeps open.
            self.log(f"cannot ingest: {e}")
            return None
        if result.ingested:
            self.log(f"ingested {len(result.ingested)} segment(s) up to {result.ingested[-1]}")
        return result

    def stop_child(self):
        """SIGINT: pg_receivewal flushes what it has and exits; the .partial stays for next time."""
        if self.child is None or self.child.proc.poll() is not None:
            return
        self.child.proc.send_signal(signal.SIGINT)
        try:
            self.child.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.child.proc.kill()
            self.child.proc.wait()
        self.log("pg_receivewal stopped")
